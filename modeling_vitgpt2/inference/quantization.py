"""Int8 CPU inference: dynamic int8 quantization of the captioner's linear layers (weights int8, activations
quantized per batch as they come), through `torch.ao.quantization.quantize_dynamic`.

Why not transformers' `TorchAoConfig` (torchao), the HF-native route: tried with torchao 0.18 on torch 2.14's CPU
build, (a) torchao's int8 tensors have no fast CPU kernel in eager mode, so its int8-dynamic and int8-weight-only
layers ran slower than float32 here (benchmarks/README.md, "Int8"), and (b) transformers' torchao integration
quantizes `nn.Linear` only, so GPT-2's `Conv1D` layers (the whole decoder) would stay float32. `quantize_dynamic`
runs fbgemm/oneDNN int8 kernels in eager mode. It is deprecated in torch 2.14 in favour of torchao, so this module
is the one place to switch once torchao's CPU path is fast.

The vocabulary projection, tied to the input embedding, gets an int8 copy of its own, quantized per output row
(per-channel): the embedding stays float32, and one scale for all 50257 rows would flatten the rows of rare tokens.
It is read in full at every decoding step, so in float32 it was a fifth of int8 decoding.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .prepacking import float32_cpu_model, refuse_to_save

__all__ = ["QUANTIZATION_CHOICES", "conv1d_to_linear", "quantize_for_cpu"]

QUANTIZATION_CHOICES = ("int8",)


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


def _replace_conv1d(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, Conv1D):
            setattr(module, name, conv1d_to_linear(child))
        else:
            _replace_conv1d(child)


def quantize_for_cpu(model: nn.Module, quantize: str = "int8") -> nn.Module:
    """Returns `model` (a loaded captioner, or a peft model on one) with its linear layers in int8, for CPU inference.

    Quantizes in place where it can; use the returned model. The vision encoder's linear layers, the decoder's
    attention and MLP products and the vocabulary projection (per output row, untied from the input embedding)
    become int8; the patch embedding, layer norms and embeddings stay float32.
    """
    if quantize not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantize={quantize!r} is not supported; choose one of {QUANTIZATION_CHOICES}")
    model = float32_cpu_model(model, "int8 quantization")
    _replace_conv1d(model)
    vocabulary = model.get_output_embeddings()
    head = nn.Linear(vocabulary.in_features, vocabulary.out_features, bias=False)
    head.weight = nn.Parameter(vocabulary.weight.detach().clone())  # untied: the input embedding stays float32
    model.set_output_embeddings(head)
    targets = {name: torch.ao.quantization.per_channel_dynamic_qconfig if name == "lm_head"
               else torch.ao.quantization.default_dynamic_qconfig
               for name, module in model.named_modules() if type(module) is nn.Linear}
    with warnings.catch_warnings():
        # The deprecation notices point to torchao, which this module chose against (see the module docstring).
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        model = torch.ao.quantization.quantize_dynamic(model, targets, dtype=torch.qint8, inplace=True)
    refuse_to_save(model, "quantized to int8 for CPU inference", "quantize=None")
    return model
