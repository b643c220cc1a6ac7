"""Int8 CPU inference: dynamic int8 quantization of the captioner's linear layers (weights int8, activations
quantized per batch as they come), through `torch.ao.quantization.quantize_dynamic`.

Why not transformers' `TorchAoConfig` (torchao), the HF-native route: tried with torchao 0.18 on torch 2.14's CPU
build, (a) torchao's int8 tensors have no fast CPU kernel in eager mode, so its int8-dynamic and int8-weight-only
layers ran slower than float32 here (benchmarks/README.md, "Int8"), and (b) transformers' torchao integration
quantizes `nn.Linear` only, so GPT-2's `Conv1D` layers (the whole decoder) would stay float32. `quantize_dynamic`
runs fbgemm/oneDNN int8 kernels in eager mode. It is deprecated in torch 2.14 in favour of torchao, so this module
is the one place to switch once torchao's eager CPU path is fast. torchao compiled is fast for the vision encoder,
whose shapes never change: `quantize="int8-compiled"` takes that route for it (`compiled_encoder.py`); the decoder's
shapes change at every step of `generate`, and compiling its step was slower than these eager layers.

The vocabulary projection, tied to the input embedding, gets an int8 copy of its own, quantized per output row
(per-channel): the embedding stays float32, and one scale for all 50257 rows would flatten the rows of rare tokens.
It is read in full at every decoding step, so in float32 it was a fifth of int8 decoding.

Memory: `load_quantized` (what `load_for_inference(..., quantize="int8")` runs) reads a saved model, and a LoRA
adapter on it, straight into int8 one layer at a time from its safetensors files, so the float32 model is never
resident: loading it with `from_pretrained` and quantizing that held the float32 weights (and every page of the
weights file it had read, which `from_pretrained`'s memory-mapped tensors keep resident) next to the int8 ones.
`quantize_for_cpu`, for a model already in memory, also goes one layer at a time and frees each float32 layer.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from peft import PeftConfig, PeftModel, PeftType
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors import safe_open
from torch import nn
from transformers import GenerationConfig
from transformers.pytorch_utils import Conv1D

from ..model.configuration_vitgpt2 import ViTGPT2Config
from ..model.modeling_vitgpt2 import ViTGPT2ForConditionalGeneration, ViTGPT2LMHead
from ..utils.io import read_json
from .compiled_encoder import (
    CompiledInt8VisionTrunk,
    compile_int8_vision_trunk,
    int8_vision_trunk_digest,
    load_cached_int8_vision_trunk,
)
from .loading import QUANTIZATION_CHOICES
from .prepacking import float32_cpu_model, merge_adapter, refuse_to_save

__all__ = ["conv1d_to_linear", "load_quantized", "quantize_for_cpu"]

DynamicInt8Linear = torch.ao.nn.quantized.dynamic.Linear


def conv1d_to_linear(conv: Conv1D) -> nn.Linear:
    """The same function as GPT-2's `Conv1D` (weight stored in x out) as an `nn.Linear` (weight stored out x in)."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


@contextmanager
def _quiet_deprecations() -> Iterator[None]:
    with warnings.catch_warnings():
        # The deprecation notices point to torchao, which this module chose against (see the module docstring).
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        yield


def _int8(linear: nn.Linear, per_output_row: bool) -> DynamicInt8Linear:
    """`linear` as a dynamic int8 layer: what `quantize_dynamic` swaps in for it, with the same observers."""
    linear.qconfig = (torch.ao.quantization.per_channel_dynamic_qconfig if per_output_row
                      else torch.ao.quantization.default_dynamic_qconfig)
    with _quiet_deprecations():
        return DynamicInt8Linear.from_float(linear)


# Compared by exact type: a subclass may read its weight elsewhere (`nn.MultiheadAttention`'s output projection does).
_LINEAR_TYPES = (Conv1D, nn.Linear)


def _int8_layer(layer: Conv1D | nn.Linear) -> DynamicInt8Linear:
    return _int8(conv1d_to_linear(layer) if type(layer) is Conv1D else layer, per_output_row=False)


def _int8_vocabulary_projection(weight: torch.Tensor) -> DynamicInt8Linear:
    """An int8 vocabulary projection from the output embeddings' (vocabulary x width) float32 weight (the input
    embedding's when tied, which stays float32): the int8 layer holds its own quantized copy, so the float32 weight
    is not cloned."""
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    head.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return _int8(head, per_output_row=True)


def _release_freed_memory() -> None:
    """Hands the memory of freed float32 weights back to the system, after each layer is quantized.

    glibc's malloc keeps freed heap memory for the process to reuse and returns it only from the top of the heap;
    a layer's weights (a few MB) come from the heap once glibc has raised its mmap threshold, and the float32 ones,
    freed among int8 ones allocated after them, would otherwise stay resident, up to the whole float32 encoder by
    the end of it. `malloc_trim` is glibc's documented call for this (it releases free pages anywhere in the heap);
    other C libraries (musl, macOS) lack it and need nothing here.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def quantize_for_cpu(model: nn.Module, quantize: str = "int8") -> nn.Module:
    """Returns `model` (a loaded captioner, or a peft model on one) with its linear layers in int8, for CPU inference.

    Quantizes in place, one layer at a time, each float32 weight dropped as soon as its int8 layer exists, so the
    model never holds both copies of more than one layer; use the returned model. The vision encoder's linear
    layers, the decoder's attention and MLP products and the vocabulary projection (per output row, untied from the
    input embedding) become int8; the patch embedding, layer norms and embeddings stay float32.
    `load_quantized` loads a saved model straight into this form without the float32 model.
    """
    _check_choice(quantize)
    model = float32_cpu_model(model, "int8 quantization")
    if quantize == "int8-compiled":
        _compile_encoder(model)
    _quantize_linear_layers(model)
    if not isinstance(model.get_output_embeddings(), DynamicInt8Linear):  # `load_quantized` may have made it
        model.set_output_embeddings(_int8_vocabulary_projection(model.get_output_embeddings().weight))
    _release_freed_memory()
    refuse_to_save(model, "quantized to int8 for CPU inference", "quantize=None")
    return model


def _compile_encoder(model: nn.Module, checkpoint: _Checkpoint | None = None) -> None:
    """Replaces the float32 timm ViT inside `model`'s encoder by its compiled int8 form (once): from the cache of
    compiled encoders when it holds one for these weights, else compiled now. Weights of the ViT still empty (meta)
    are read from `checkpoint`: one at a time for the digest, and all of them only if the encoder must be compiled."""
    encoder = model.get_encoder()
    vit = encoder.model
    if isinstance(vit, CompiledInt8VisionTrunk):
        return
    if encoder.image_size is None:
        raise ValueError(f"--quantize int8-compiled compiles the encoder for its image size, and "
                         f"{model.config.encoder_name!r} has none (no patch embedding); use --quantize int8")
    prefix = next(name for name, module in model.named_modules() if module is vit) + "."

    def float32_state() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in vit.state_dict().items():
            yield name, checkpoint.tensor(prefix + name) if tensor.is_meta else tensor

    digest = int8_vision_trunk_digest(float32_state(), encoder.image_size)
    if checkpoint is not None:
        _fill(vit.patch_embed, prefix + "patch_embed.", checkpoint, lambda name: True)
    compiled = load_cached_int8_vision_trunk(digest, vit)
    if compiled is None:
        if checkpoint is not None:
            _fill(vit, prefix, checkpoint, lambda name: True)
        compiled = compile_int8_vision_trunk(model.config, vit, digest)
    encoder.model = compiled
    _release_freed_memory()


def _check_choice(quantize: str) -> None:
    if quantize not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantize={quantize!r} is not supported; choose one of {QUANTIZATION_CHOICES}")


class _Checkpoint:
    """The float32 tensors of a saved model's safetensors files (one file or an index of shards), read one at a time.

    safetensors returns tensors that live in a (copy-on-write) memory map of the whole file, and every page read
    through the map counts as resident for as long as any such tensor lives. So each tensor is copied out and its
    map dropped at once: the float32 embeddings and norms the model keeps would otherwise keep the map alive, and
    with it every weight page the load read."""

    def __init__(self, folder: Path):
        # The single file first, as `from_pretrained` reads them: a folder saved sharded and then saved again in one
        # file keeps the old index (its shards deleted), and a float32 load reads the one file.
        single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
        if single.is_file():
            with safe_open(single, "pt") as weights:
                self.files = dict.fromkeys(weights.keys(), single)
        else:
            weight_map = read_json(index, "weights index")
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no 'weight_map' object naming each weight's file; save the model "
                                 "again")
            self.files = {key: folder / file for key, file in weight_map.items()}
        self.float32 = True
        for file in set(self.files.values()):
            with safe_open(file, "pt") as weights:
                self.float32 &= all(weights.get_slice(key).get_dtype() == "F32" for key in weights.keys())

    def tensor(self, key: str) -> torch.Tensor:
        with safe_open(self.files[key], "pt") as weights:
            return weights.get_tensor(key).clone()


def load_quantized(folder: str | os.PathLike, quantize: str = "int8",
                   adapter: str | os.PathLike | None = None) -> nn.Module | None:
    """The full model saved in `folder` (with the LoRA `adapter` folder merged into it, if given) loaded straight into
    `quantize_for_cpu`'s form, with the same weights, without ever holding the float32 model: built with empty
    (meta) weights, then filled from its safetensors files, each linear layer quantized as soon as it is read. The
    model then holds its int8 weights, the float32 embeddings and norms, and one float32 layer at most while loading.

    An adapter's layers (its LoRA targets and the modules it saves whole) are read in float32 first, the adapter is
    loaded and merged into them by peft, and only then is everything quantized.

    Returns None for what this cannot read key for key as `from_pretrained` would (no safetensors file, weights that
    are not float32, keys the model does not have or lacks, an adapter other than LoRA or on a base that is no local
    folder): load those with `from_pretrained` and `quantize_for_cpu`, which refuses or loads them as before.
    """
    _check_choice(quantize)
    folder = Path(folder)
    changed_by_adapter = _changed_by_adapter(adapter) if adapter is not None else (lambda name: False)
    if changed_by_adapter is None:
        return None
    compile_encoder = quantize == "int8-compiled"

    def keep_float32(name: str) -> bool:  # read in float32 now: for the adapter to merge into
        return changed_by_adapter(name)

    if not (
            (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()):
        return None
    checkpoint = _Checkpoint(folder)
    config = ViTGPT2Config.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):  # buffers are computed, not saved: build them as usual
        model = ViTGPT2ForConditionalGeneration(config)
    tied = config.tie_word_embeddings and "lm_head.weight" not in checkpoint.files
    expected = set(model.state_dict()) - ({"lm_head.weight"} if tied else set())
    # A tied vocabulary projection is read from the input embedding after the merge, which an adapter that saves or
    # tunes the embedding has replaced; peft's model (and `quantize_for_cpu` of it) keeps projecting with the base's.
    if not checkpoint.float32 or expected != set(checkpoint.files) or changed_by_adapter("lm_head") or (
            tied and changed_by_adapter("decoder.wte")):
        return None
    # All but the linear layers an adapter leaves alone; those stay empty until after the merge, since torch's int8
    # layers cannot take part in the partial `load_state_dict` by which peft loads an adapter.
    _fill(model, "", checkpoint, lambda name: keep_float32(name) or not _is_linear_name(model, name))
    model.config.name_or_path = str(folder)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    if adapter is not None:
        model = merge_adapter(PeftModel.from_pretrained(model, adapter))
    if compile_encoder:
        _compile_encoder(model, checkpoint)
    _quantize_linear_layers(model, checkpoint)
    model.set_output_embeddings(_int8_vocabulary_projection(
        model.get_input_embeddings().weight if tied else checkpoint.tensor("lm_head.weight")))
    _release_freed_memory()
    return model.eval()


def _changed_by_adapter(adapter: str | os.PathLike) -> Callable[[str], bool] | None:
    """Whether a LoRA adapter changes the module of a given name (a target, or within a module it saves whole); None
    for other adapters, whose layers are not known here."""
    config = PeftConfig.from_pretrained(adapter)
    if config.peft_type != PeftType.LORA:
        return None
    saved_whole = [name.split(".") for name in config.modules_to_save or ()]

    def changed(name: str) -> bool:
        parts = name.split(".")
        return bool(check_target_module_exists(config, name)) or any(
            parts[start:start + len(saved)] == saved for saved in saved_whole for start in range(len(parts)))

    return changed


def _is_linear_name(model: nn.Module, name: str) -> bool:
    return type(model.get_submodule(name)) in (*_LINEAR_TYPES, ViTGPT2LMHead)


def _fill(module: nn.Module, prefix: str, checkpoint: _Checkpoint, wanted: Callable[[str], bool]) -> None:
    """Reads the still empty (meta) weights of `module` and of the submodules `wanted` names from `checkpoint`, in
    float32; weights already read (and maybe merged with an adapter) stay."""
    for name, parameter in list(module.named_parameters(recurse=False)):
        if parameter.is_meta:
            module._parameters[name] = nn.Parameter(checkpoint.tensor(prefix + name),
                                                    requires_grad=parameter.requires_grad)
    for name in list(module._buffers):
        if prefix + name in checkpoint.files:
            module._buffers[name] = checkpoint.tensor(prefix + name)
    for name, child in module.named_children():
        if wanted(prefix + name):
            _fill(child, f"{prefix}{name}.", checkpoint, wanted)


def _quantize_linear_layers(module: nn.Module, checkpoint: _Checkpoint | None = None, prefix: str = "") -> None:
    """Replaces every linear layer of `module` by its int8 form, one at a time, reading a layer that is still empty
    (meta) from `checkpoint` first."""
    for name in list(module._modules):  # names, not modules: a replaced float32 layer must not stay referenced
        child = module._modules[name]
        if child is None:
            continue
        if type(child) not in _LINEAR_TYPES:
            _quantize_linear_layers(child, checkpoint, f"{prefix}{name}.")
            continue
        if child.weight.is_meta:
            _fill(child, f"{prefix}{name}.", checkpoint, lambda name: True)
        setattr(module, name, _int8_layer(child))
        del child
        _release_freed_memory()
