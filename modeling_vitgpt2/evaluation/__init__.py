"""Measuring captions: the metric registry (CIDEr, CLIPScore, ...), CLIP zero-shot, attention maps and the caption,
score and report jobs behind `eval.py`."""
