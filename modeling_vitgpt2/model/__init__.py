"""The model unit: configuration, model and processor (the files `save_pretrained` copies for remote code, which
import only each other) and the converter from `VisionEncoderDecoderModel`."""
