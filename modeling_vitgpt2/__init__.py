"""ViTGPT2: a Hugging Face-native image captioner (timm ViT encoder + GPT-2 decoder with cross-attention)."""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from .model.configuration_vitgpt2 import ViTGPT2Config
from .model.modeling_vitgpt2 import ViTGPT2ForConditionalGeneration, ViTGPT2PreTrainedModel
from .model.processing_vitgpt2 import ImageLoadError, ViTGPT2Processor, as_rgb_image, load_image

# In-package Auto classes, and `auto_map` + copied source files in every saved folder so that
# `trust_remote_code=True` works where this package is not installed.
AutoConfig.register(ViTGPT2Config.model_type, ViTGPT2Config, exist_ok=True)
AutoModelForImageTextToText.register(ViTGPT2Config, ViTGPT2ForConditionalGeneration, exist_ok=True)
AutoProcessor.register(ViTGPT2Config, ViTGPT2Processor, exist_ok=True)
ViTGPT2Config.register_for_auto_class()
ViTGPT2ForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
ViTGPT2Processor.register_for_auto_class()

__all__ = [
    "ImageLoadError",
    "ViTGPT2Config",
    "ViTGPT2ForConditionalGeneration",
    "ViTGPT2PreTrainedModel",
    "ViTGPT2Processor",
    "as_rgb_image",
    "load_image",
]
