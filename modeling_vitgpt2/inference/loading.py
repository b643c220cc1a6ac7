"""Loading a trained output folder for inference: a full model, or a peft adapter on the base model it records."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import snapshot_download
from peft import PeftModel
from torch import nn

from ..model.modeling_vitgpt2 import ViTGPT2ForConditionalGeneration
from ..utils.io import read_json

__all__ = ["BASE_MODEL_FOLDER", "is_peft_model", "load_for_inference", "model_folder"]

# Where a run saves the base model it built for its adapter, and where a pushed adapter repository carries it.
BASE_MODEL_FOLDER = "base_model"


def model_folder(name: str | os.PathLike) -> Path:
    """`name` itself when it is a folder, else the downloaded (or cached) files of the Hub repository it names, so
    that a pushed adapter repository, with its bundled `base_model/`, loads as its output folder does."""
    if Path(name).is_dir():
        return Path(name)
    try:
        return Path(snapshot_download(str(name)))
    except Exception as error:  # invalid id, offline without a cached copy, no such repository, no access
        raise OSError(f"{name} is neither a folder nor a Hub repository that could be downloaded "
                      f"({type(error).__name__}: {error}); pass a model folder, adapter folder or Hub id") from error


def load_for_inference(path: str | os.PathLike, quantize: str | None = None, **kwargs):
    """Loads a trained output folder or Hub repository: a full model, or a peft adapter on the base model recorded
    in it.

    `quantize="int8"` returns it ready for int8 inference on the CPU (`quantization.quantize_for_cpu`; an adapter is
    merged into the weights first); other keyword arguments go to `from_pretrained`.
    """
    if quantize is not None:
        from .quantization import quantize_for_cpu

        return quantize_for_cpu(load_for_inference(path, **kwargs), quantize)
    path = model_folder(path)
    if (path / "adapter_config.json").is_file():
        # A base built by the run travels with it (locally, and in pushed repos) as `base_model/`.
        bundled_base = path / BASE_MODEL_FOLDER
        if (bundled_base / "config.json").is_file():
            base_path = str(bundled_base)
        else:
            base_path = read_json(path / "adapter_config.json", "adapter config")["base_model_name_or_path"]
        base = ViTGPT2ForConditionalGeneration.from_pretrained(base_path, **kwargs)
        return PeftModel.from_pretrained(base, path).eval()
    return ViTGPT2ForConditionalGeneration.from_pretrained(path, **kwargs).eval()


def is_peft_model(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)
