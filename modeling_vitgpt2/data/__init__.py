"""Caption data: COCO-style and `datasets` sources, streamed WebDataset shards, the encoder feature cache and the
synthetic shapes set."""
