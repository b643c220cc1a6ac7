"""Loading a trained output folder for inference: a full model, or a peft adapter on the base model it records."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from peft import PeftModel
from torch import nn

from ..model.modeling_vitgpt2 import ViTGPT2ForConditionalGeneration
from ..utils.cpu_features import has_fast_bfloat16
from ..utils.errors import UserError
from ..utils.io import check_safetensors, read_json

__all__ = [
    "BASE_MODEL_FOLDER",
    "INFERENCE_DTYPES",
    "QUANTIZATION_CHOICES",
    "adapter_base",
    "check_inference_dtype",
    "check_model_folder",
    "is_peft_model",
    "load_for_inference",
    "model_folder",
]

# Where a run saves the base model it built for its adapter, and where a pushed adapter repository carries it.
BASE_MODEL_FOLDER = "base_model"
INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# int8: eager int8 layers, ready at once (quantization.py); int8-compiled: the vision encoder compiled for the CPU's
# int8 kernels first, tens of seconds at load for a faster encoder (compiled_encoder.py).
QUANTIZATION_CHOICES = ("int8", "int8-compiled")


def check_inference_dtype(dtype: str | None, device: str | torch.device = "cpu",
                          quantize: str | None = None) -> torch.dtype | None:
    """The torch dtype named by `--dtype` (None: the saved weights' float32), refused where it cannot be fast.

    bfloat16 on a CPU needs its bfloat16 instructions (avx512_bf16, or AMX): elsewhere torch emulates bfloat16 in
    float32 arithmetic, tens of times slower than float32 itself, so a load there is refused rather than left slow.
    """
    if dtype is None:
        return None
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported: choose one of {', '.join(INFERENCE_DTYPES)}")
    if dtype == "bfloat16":
        if quantize is not None:
            raise UserError(f"--dtype bfloat16 and --quantize {quantize} exclude each other: int8 replaces the "
                            "float weights; choose one")
        if torch.device(device).type == "cpu" and not has_fast_bfloat16():
            raise UserError("--dtype bfloat16 needs a CPU with bfloat16 instructions (avx512_bf16 or AMX among "
                            "/proc/cpuinfo's flags); this CPU has neither, and emulated bfloat16 is far slower than "
                            "float32: leave --dtype at float32, or use --quantize int8 for speed on the CPU")
    return INFERENCE_DTYPES[dtype]


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


def load_for_inference(path: str | os.PathLike, quantize: str | None = None, dtype: str | torch.dtype | None = None,
                       device: str | torch.device = "cpu", **kwargs):
    """Loads a trained output folder or Hub repository onto `device`: a full model, or a peft adapter on the base
    model recorded in it.

    `quantize="int8"` returns it ready for int8 inference on the CPU (`quantization.quantize_for_cpu`; an adapter is
    merged into the weights first); a full model, or a LoRA adapter on one, is read straight into int8
    (`quantization.load_quantized`), so its float32 weights are never all resident. `dtype="bfloat16"` loads it in
    bfloat16 (`check_inference_dtype` says where that is refused); a `torch.dtype` goes to `from_pretrained`
    unchecked, as other keyword arguments do.
    """
    if isinstance(dtype, torch.dtype):
        kwargs["dtype"], dtype = dtype, None
    torch_dtype = check_inference_dtype(dtype, device, quantize)
    path = model_folder(path)
    if quantize is not None:
        from .quantization import load_quantized, quantize_for_cpu

        # Straight from the weights file into int8 where it can, so the float32 model is never resident (a LoRA
        # adapter's layers stay float32 until it is merged into them); `from_pretrained`'s options take the
        # float32 route.
        adapter = (path / "adapter_config.json").is_file()
        quantized = None if kwargs else load_quantized(adapter_base(path) if adapter else path, quantize,
                                                       adapter=path if adapter else None)
        if quantized is None:
            quantized = load_for_inference(path, **{"dtype": torch.float32, **kwargs})
        return quantize_for_cpu(quantized, quantize)
    # float32 unless asked otherwise, whatever the weights were saved in: transformers would keep a bfloat16 or
    # float16 checkpoint's dtype, which int8 refuses and a CPU without bfloat16 instructions emulates slowly.
    kwargs["dtype"] = torch_dtype if torch_dtype is not None else kwargs.get("dtype", torch.float32)
    if (path / "adapter_config.json").is_file():
        base = ViTGPT2ForConditionalGeneration.from_pretrained(adapter_base(path), **kwargs)
        model = PeftModel.from_pretrained(base, path)
    else:
        model = ViTGPT2ForConditionalGeneration.from_pretrained(path, **kwargs)
    # An adapter's own weights load in float32 whatever the base's dtype: one dtype throughout.
    return (model if torch_dtype is None else model.to(torch_dtype)).to(device).eval()


def adapter_base(folder: Path) -> str:
    """The base model of the peft adapter saved in `folder`: the `base_model/` a run built and saved beside it (it
    travels with the adapter, locally and in pushed repositories), else the folder or Hub id that
    adapter_config.json records as `base_model_name_or_path`."""
    bundled = folder / BASE_MODEL_FOLDER
    if (bundled / "config.json").is_file():
        return str(bundled)
    recorded = read_json(folder / "adapter_config.json", "adapter config").get("base_model_name_or_path")
    if not recorded:
        raise ValueError(f"{folder / 'adapter_config.json'} records no base_model_name_or_path and {folder} has no "
                         f"{BASE_MODEL_FOLDER}/: set base_model_name_or_path to the base model's folder or Hub id")
    return recorded


def check_model_folder(folder: Path) -> None:
    """Fails naming the file, before anything is loaded, when a saved captioner (or train.py's adapter folder) lacks
    its weights or tokenizer or has damaged weights; loading would otherwise stop with a message that names no file
    or blames a missing library. An adapter's base is checked too when it is a local folder."""
    adapter = (folder / "adapter_config.json").is_file()
    weights = [folder / name for name in ("adapter_model.safetensors",) if adapter] or sorted(
        folder.glob("model*.safetensors"))
    if not adapter and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: give the folder a model was saved to (save_pretrained)")
    if adapter and not weights[0].is_file():
        _missing_adapter_weights(folder)
    if not weights and not (folder / "pytorch_model.bin").is_file():
        raise FileNotFoundError(f"{folder} has no weights (model.safetensors): the model was not fully saved; save it "
                                "again")
    for path in weights:
        check_safetensors(path)
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise FileNotFoundError(f"{folder} has no tokenizer (tokenizer.json): save the processor with the model "
                                "(processor.save_pretrained(folder))")
    if adapter:
        base = Path(adapter_base(folder))
        if base.is_dir():
            check_model_folder(base)


def _missing_adapter_weights(folder: Path) -> None:
    pickled = folder / "adapter_model.bin"
    if pickled.is_file():
        # A pickle can run code when it is loaded; safetensors holds tensors only.
        raise ValueError(
            f"{pickled}: adapter weights as a pickle, and no adapter_model.safetensors; this project loads adapter "
            "weights only from safetensors, which cannot run code. If you trust the file, convert it: python -c "
            f"\"import torch, safetensors.torch as st; st.save_file(torch.load('{pickled}', weights_only=True), "
            f"'{folder / 'adapter_model.safetensors'}')\""
        )
    raise FileNotFoundError(f"{folder} has adapter_config.json but no adapter weights (adapter_model.safetensors): "
                            "the adapter was not fully saved; save it again (model.save_pretrained(folder))")


def is_peft_model(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)
