"""Float32 CPU inference with the linear layers' weights prepacked by oneDNN.

Why: BLAS (MKL) multiplies the few rows of a beam-search step (3 per image with 3 beams) by a weight matrix at a
fraction of the machine's memory bandwidth, and every decoding step streams every decoder weight and the whole
vocabulary projection; oneDNN's matmul with the weight reordered once into its blocked layout is several times
faster there, and faster for the encoder's large products too (benchmarks/README.md, "Prepacked weights"). Same
float32 arithmetic, summed in another order: outputs differ from BLAS's by rounding only.

Why by hand: this is what `torch.compile` with freezing does to a CPU graph (through the same oneDNN operator), but it
compiles per input shape and transformers' beam search does not run a compiled forward; Intel's extension
(`ipex.optimize`), the library that used to do this in eager mode, is discontinued and does not support torch 2.14.
`torch.ops.mkldnn._linear_pointwise` is the operator torch's own compiler emits, so it ships with every x86/ARM CPU build.

A prepacked model is for inference only: no gradients, CPU only, and it cannot be saved (its packed weights are not
parameters); load the model again to train, move or save it.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..model.modeling_vitgpt2 import ViTGPT2LMHead
from .loading import is_peft_model

__all__ = ["PrepackedLinear", "can_prepack", "float32_cpu_model", "merge_adapter", "prepack_for_cpu", "refuse_to_save"]


def _has_onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def can_prepack(model: nn.Module) -> bool:
    """Whether `prepack_for_cpu` takes `model`: a float32 model on the CPU, with no adapter or one that merges, on a
    torch build with oneDNN."""
    return _has_onednn() and _refusal(model, "prepacking") is None


class PrepackedLinear(nn.Module):
    """`x @ weight.T + bias` with the (out x in) weight reordered once for oneDNN's CPU matmul."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, name: str):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.name = name
        # Plain attributes, not buffers: `.to()` must not move them and `state_dict` cannot hold them.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
        self.bias = None if bias is None else bias.detach().clone()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.device.type != "cpu" or hidden_states.dtype != torch.float32:
            raise RuntimeError(f"{self.name} is prepacked for float32 CPU inference, got {hidden_states.dtype} on "
                               f"{hidden_states.device}: load the model with prepack=False to move or cast it")
        return torch.ops.mkldnn._linear_pointwise(hidden_states.contiguous(), self.packed_weight, self.bias,
                                                  "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError(f"{self.name} is prepacked for CPU inference and cannot be saved: load the model again "
                           "with prepack=False to save it")


def _refusal(model: nn.Module, purpose: str) -> str | None:
    """Why `float32_cpu_model` refuses `model` for `purpose`, or None when it takes it."""
    if is_peft_model(model) and not hasattr(model.base_model, "merge_and_unload"):
        return (f"{purpose} needs an adapter that merges into the weights (LoRA, adapters); "
                f"{model.peft_config['default'].peft_type} cannot be merged: load this model without {purpose}")
    parameter = next(model.parameters())
    if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        return (f"{purpose} starts from a float32 model on the CPU, got {parameter.dtype} on {parameter.device}: "
                "load it without a dtype or device")
    return None


def float32_cpu_model(model: nn.Module, purpose: str) -> nn.Module:
    """`model` in eval mode, with its peft adapter (if any) folded into the weights, checked to be float32 on the CPU:
    what inference layers that cannot carry an adapter beside them (int8, prepacked) start from."""
    refusal = _refusal(model, purpose)
    if refusal is not None:
        raise ValueError(refusal)
    if is_peft_model(model):
        model = merge_adapter(model)
    return model.eval()


def merge_adapter(model: PeftModel) -> nn.Module:
    """`model`'s base model with its adapter merged into the weights, computing what the unmerged adapter computes.

    GPT-2 ties its LM head to its token embedding: one weight for both. Unmerged, an adapter on either module (one
    made before training refused them, or by another tool) changes that module alone, the other reading the base
    weight; peft 0.21 merges into the shared weight, which changes both, and the merged model captions differently.
    So the head gets its own copy of the weight first, and each module takes only its own adapter's delta.
    """
    base = model.get_base_model()
    head, embedding = base.get_output_embeddings(), base.get_input_embeddings()
    head_layer, embedding_layer = (module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
                                   for module in (head, embedding))
    adapted = isinstance(head, BaseTunerLayer) or isinstance(embedding, BaseTunerLayer)
    if adapted and head_layer is not None and head_layer.weight is getattr(embedding_layer, "weight", None):
        head_layer.weight = nn.Parameter(head_layer.weight.detach().clone(), head_layer.weight.requires_grad)
        # The in-memory model only (saving an inference model is refused): transformers' `tie_weights` would
        # otherwise point the head back at the merged embedding.
        base.config.tie_word_embeddings = False
    return model.merge_and_unload()


def _prepacked(module: nn.Module, name: str) -> PrepackedLinear | None:
    # Exact types: a subclass may read its weight elsewhere (`nn.MultiheadAttention`'s output projection does).
    if type(module) is Conv1D:  # GPT-2 stores (in x out)
        return PrepackedLinear(module.weight.T, module.bias, name)
    if type(module) in (nn.Linear, ViTGPT2LMHead):
        return PrepackedLinear(module.weight, module.bias, name)
    return None


def prepack_for_cpu(model: nn.Module, layers: Collection[str] | None = None) -> nn.Module:
    """Returns `model` (a loaded captioner, or a peft model on one) with every linear layer of its encoder, decoder
    and vocabulary projection (or only those named in `layers`) prepacked for float32 CPU inference. Works in place;
    use the returned model.

    A peft adapter is merged into the weights first (one that cannot be merged, such as prefix tuning, is refused).
    The vocabulary projection keeps its tied weight for the input embedding, so the model holds one more copy of it.
    """
    if not _has_onednn():
        raise RuntimeError("this torch build has no oneDNN (torch.backends.mkldnn): load the model with prepack=False")
    model = float32_cpu_model(model, "prepacking")
    output_embeddings = model.get_output_embeddings()
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            packed = _prepacked(child, name) if layers is None or name in layers else None
            if packed is None:
                continue
            if child is output_embeddings:
                # Output embeddings keep their `weight`, as transformers' embedding API expects of them; it is the
                # input embedding's, so this costs nothing.
                packed.weight = child.weight
            setattr(parent, child_name, packed)
    refuse_to_save(model, "prepacked for CPU inference", "prepack=False")
    return model


def refuse_to_save(model: nn.Module, what: str, load_option: str) -> None:
    """Makes `model.save_pretrained` raise before it writes anything: an inference-only model (prepacked, int8)
    would otherwise write its config and code and then fail on weights it cannot write, leaving a folder that looks
    like a model."""
    def save_pretrained(*args, **kwargs):
        raise RuntimeError(f"this model is {what} and cannot be saved: load it again with {load_option} to save it")
    model.save_pretrained = save_pretrained
