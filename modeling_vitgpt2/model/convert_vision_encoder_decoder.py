"""Converts a transformers `VisionEncoderDecoderModel` (a `ViTModel` encoder and a GPT-2 decoder with
cross-attention, like `nlpconnect/vit-gpt2-image-captioning`) into a `ViTGPT2ForConditionalGeneration` with identical
outputs, plus the matching processor.

A tool, not part of the model: like transformers' `convert_*` scripts it stays out of the remote-code files saved
next to the weights (`modeling_vitgpt2.py` does not import it).

    python -m modeling_vitgpt2.model.convert_vision_encoder_decoder nlpconnect/vit-gpt2-image-captioning converted/

or in Python:

    from modeling_vitgpt2.model.convert_vision_encoder_decoder import convert_vision_encoder_decoder
    model = convert_vision_encoder_decoder("nlpconnect/vit-gpt2-image-captioning")
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ..utils.errors import run_command
from .configuration_vitgpt2 import ViTGPT2Config, decoder_fields_from_gpt2
from .modeling_vitgpt2 import ViTGPT2ForConditionalGeneration
from .processing_vitgpt2 import ViTGPT2Processor

__all__ = ["convert_vision_encoder_decoder", "main"]


def convert_vision_encoder_decoder(model_or_path) -> ViTGPT2ForConditionalGeneration:
    """A `VisionEncoderDecoderModel` (or a folder / Hub id of one) as this package's model, with identical outputs.

    The ViT becomes a timm `vit_base_patch16_224`-architecture encoder of the same sizes; an `enc_to_dec_proj`
    layer is folded into every cross-attention key/value projection (both are linear), and the encoder keeps the
    ViT's LayerNorm epsilon (`layer_norm_eps`, usually 1e-12 where timm's ViTs use 1e-6).
    Use `ViTGPT2Processor.from_vision_encoder_decoder(path)` for the matching processor.
    """
    from transformers import VisionEncoderDecoderModel

    if isinstance(model_or_path, (str, os.PathLike)):
        model_or_path = VisionEncoderDecoderModel.from_pretrained(model_or_path)
    vit, gpt2 = model_or_path.encoder, model_or_path.decoder
    if type(vit).__name__ != "ViTModel" or type(gpt2).__name__ != "GPT2LMHeadModel":
        raise ValueError(
            f"can convert a ViTModel encoder with a GPT2LMHeadModel decoder, got {type(vit).__name__} and "
            f"{type(gpt2).__name__}"
        )
    vit_config, gpt2_config = vit.config, gpt2.config
    if vit_config.hidden_act != "gelu" or not gpt2_config.add_cross_attention:
        raise ValueError("the ViT must use exact GELU and the GPT-2 decoder must have cross-attention")
    if (gpt2_config.scale_attn_by_inverse_layer_idx or gpt2_config.reorder_and_upcast_attn
            or not gpt2_config.scale_attn_weights):
        raise ValueError("GPT-2 decoders with scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn or "
                         "scale_attn_weights=False compute other attention scores than this model's (always "
                         "scaled by 1/sqrt(head size)); they cannot be converted")
    outer = model_or_path.config
    config = ViTGPT2Config(
        encoder_name="vit_base_patch16_224",
        encoder_kwargs={
            "img_size": vit_config.image_size,
            "patch_size": vit_config.patch_size,
            "in_chans": vit_config.num_channels,
            "embed_dim": vit_config.hidden_size,
            "depth": vit_config.num_hidden_layers,
            "num_heads": vit_config.num_attention_heads,
            "mlp_ratio": vit_config.intermediate_size / vit_config.hidden_size,
            "qkv_bias": vit_config.qkv_bias,
        },
        encoder_hidden_size=vit_config.hidden_size,
        encoder_layer_norm_eps=vit_config.layer_norm_eps,
        bos_token_id=gpt2_config.bos_token_id,
        eos_token_id=outer.eos_token_id if outer.eos_token_id is not None else gpt2_config.eos_token_id,
        pad_token_id=outer.pad_token_id if outer.pad_token_id is not None else gpt2_config.eos_token_id,
        decoder_start_token_id=outer.decoder_start_token_id
        if outer.decoder_start_token_id is not None
        else gpt2_config.bos_token_id,
        tie_word_embeddings=gpt2_config.tie_word_embeddings,
        **decoder_fields_from_gpt2(gpt2_config),
    )
    model = ViTGPT2ForConditionalGeneration(config)
    model.encoder.model.load_state_dict(_timm_vit_state(vit.state_dict(), config))
    decoder_state = {
        name.removeprefix("transformer."): weight
        for name, weight in gpt2.state_dict().items()
        if name.startswith("transformer.")
    }
    projection = getattr(model_or_path, "enc_to_dec_proj", None)
    if projection is not None:
        for layer_idx in range(config.n_layer):
            prefix = f"h.{layer_idx}.crossattention.c_attn."
            weight, bias = decoder_state[prefix + "weight"], decoder_state[prefix + "bias"]
            # K/V = (x P^T + p) W + b = x (P^T W) + (p W + b), with Conv1D's (in, out) weight layout.
            decoder_state[prefix + "weight"] = projection.weight.T @ weight
            decoder_state[prefix + "bias"] = projection.bias @ weight + bias
    model.decoder.load_state_dict(decoder_state)
    if not config.tie_word_embeddings:  # GPT-2's own vocabulary projection, not a copy of its input embedding
        with torch.no_grad():
            model.lm_head.weight.copy_(gpt2.lm_head.weight)
    model.generation_config = model_or_path.generation_config.__class__.from_dict(
        model_or_path.generation_config.to_dict()
    )
    model.config._name_or_path = getattr(outer, "_name_or_path", "")
    return model.to(dtype=next(gpt2.parameters()).dtype).train(model_or_path.training)


def _timm_vit_state(state: dict[str, torch.Tensor], config: ViTGPT2Config) -> dict:
    """Renames a transformers `ViTModel` state dict to timm's VisionTransformer layout (fusing q/k/v)."""
    converted = {
        "cls_token": state["embeddings.cls_token"],
        "pos_embed": state["embeddings.position_embeddings"],
        "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": state["layernorm.weight"],
        "norm.bias": state["layernorm.bias"],
    }
    renames = {
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
        "attention.o_proj": "attn.proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for layer_idx in range(config.encoder_kwargs["depth"]):
        source, target = f"layers.{layer_idx}.", f"blocks.{layer_idx}."
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                converted[f"{target}{new}.{kind}"] = state[f"{source}{old}.{kind}"]
        for kind in ("weight", "bias"):
            parts = [state.get(f"{source}attention.{name}_proj.{kind}") for name in ("q", "k", "v")]
            if all(part is not None for part in parts):
                converted[f"{target}attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return converted


def main(argv: list[str] | None = None, prog: str = "vitgpt2 convert") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("model", help="VisionEncoderDecoderModel folder or Hub id (ViT encoder + GPT-2 decoder)")
    parser.add_argument("output_dir", type=Path, help="where to save the converted model and its processor")
    arguments = parser.parse_args(argv)

    def convert() -> None:
        model = convert_vision_encoder_decoder(arguments.model)
        processor = ViTGPT2Processor.from_vision_encoder_decoder(arguments.model)
        model.save_pretrained(arguments.output_dir)
        processor.save_pretrained(arguments.output_dir)
        print(f"saved the converted model and processor to {arguments.output_dir}")

    return run_command(prog, convert)


if __name__ == "__main__":
    sys.exit(main(prog="python -m modeling_vitgpt2.model.convert_vision_encoder_decoder"))
