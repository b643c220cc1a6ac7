"""ViTGPT2: a Hugging Face-native image captioner (timm ViT encoder + GPT-2 decoder with cross-attention)."""

import logging

# transformers imports torchao whenever it is installed (our int8-compiled extra), and torchao 0.18 registers enums
# with torch's pytree, for which torch 2.14 logs a deprecation notice on every start: nothing a user can act on.
logging.getLogger("torch.utils._pytree").addFilter(lambda record: "is an Enum subclass" not in record.getMessage())

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from .model.configuration_vitgpt2 import ViTGPT2Config  # noqa: E402
from .model.modeling_vitgpt2 import ViTGPT2ForConditionalGeneration, ViTGPT2PreTrainedModel  # noqa: E402
from .model.processing_vitgpt2 import ImageLoadError, ViTGPT2Processor, as_rgb_image, load_image  # noqa: E402

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
