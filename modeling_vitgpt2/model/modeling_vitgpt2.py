"""ViTGPT2: a timm ViT encoder feeding a GPT-2 decoder whose blocks gain cross-attention.

Each decoder block is GPT-2's (pre-norm causal self-attention, then MLP) with a cross-attention in between whose
query comes from the text and whose key/value projection reads the encoder's image tokens (1024-d for ViT-L/14)
straight into the decoder width. Module names follow GPT-2 (`decoder.h.0.attn.c_attn`, `...crossattention.c_attn`),
so GPT-2 checkpoints load unchanged and peft targets the usual names.

Generation differs from `VisionEncoderDecoderModel` in one way that matters for speed: the image tokens are not
copied once per beam. Each image's cross-attention keys/values are computed once per `generate` call and shared by
all of its beams (the queries of an image's beams are stacked and attend to one copy), and beam reordering touches
only the self-attention cache, since an image's beams always share its keys/values.

This file is copied next to the weights for `trust_remote_code=True`: it imports only torch, timm and transformers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPastAndCrossAttentions, Seq2SeqLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_vitgpt2 import ViTGPT2Config, decoder_fields_from_gpt2

__all__ = ["ViTGPT2ForConditionalGeneration", "ViTGPT2PreTrainedModel"]


logger = logging.get_logger(__name__)

# What a captioner built from pretrained parts decodes with unless told otherwise; saved in its
# generation_config.json (never set in `__init__`, where it would override a loaded generation_config.json).
CAPTION_GENERATION_DEFAULTS = {"num_beams": 3, "max_length": 40}


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    is_causal: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention that also returns its weights. `attention_mask` is transformers' 4-D mask: additive (0 or the
    dtype's minimum, as `create_causal_mask` makes it for eager) or boolean (True where a key may be seen)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if is_causal and attention_mask is None:
        query_length, key_length = scores.shape[-2:]
        attention_mask = torch.ones(query_length, key_length, dtype=torch.bool, device=scores.device).tril(
            diagonal=key_length - query_length
        )
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2)
    return output, weights


def _attention_function(config: ViTGPT2Config, output_attentions: bool) -> Callable:
    implementation = config._attn_implementation
    if output_attentions and implementation != "eager":
        # SDPA and flash kernels never materialise the weights; asking for them must not silently return nothing.
        logger.warning_once(
            f"output_attentions=True needs the attention weights, which `{implementation}` does not compute: these "
            "calls use eager attention. Load with attn_implementation='eager' to make that explicit."
        )
        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)


class ViTGPT2ImageLayer(DynamicLayer):
    """One layer's cross-attention keys/values, stored once per image and read as one row per decoder row.

    All decoder rows of an image (its beams, its sampled sequences) attend to the same keys/values, so they are kept
    once per image (`image_keys`, `image_values`: `(images, heads, image_tokens, head_dim)`) with `rows_per_image`;
    the model reads them in that form, and beam search never has to reorder or copy them. `keys`/`values` present
    them as transformers' cache utilities expect, one row per decoder row (a copy, made when read).
    """

    def __init__(self, **kwargs):
        self.rows_per_image = 1
        super().__init__(**kwargs)

    @property
    def keys(self) -> torch.Tensor | None:
        return self._per_row(self.image_keys)

    @keys.setter
    def keys(self, keys: torch.Tensor | None) -> None:
        self.image_keys = keys

    @property
    def values(self) -> torch.Tensor | None:
        return self._per_row(self.image_values)

    @values.setter
    def values(self, values: torch.Tensor | None) -> None:
        self.image_values = values

    def _per_row(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None or self.rows_per_image == 1 or tensor.numel() == 0:
            return tensor
        return tensor.repeat_interleave(self.rows_per_image, dim=0)

    def share(self, keys: torch.Tensor, values: torch.Tensor, rows: int) -> None:
        """Stores one image's keys/values per row of `keys`, for `rows` decoder rows in all."""
        self.lazy_initialization(keys, values)
        self.image_keys, self.image_values = keys, values
        self.rows_per_image = rows // keys.shape[0]

    def get_seq_length(self) -> int:
        if not self.is_initialized or self.image_keys.numel() == 0:
            return 0
        return self.image_keys.shape[-2]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # Beam search reorders an image's beams only among themselves, and they share one copy: nothing moves.
        if self.rows_per_image == 1 and self.get_seq_length() > 0:
            self.image_keys = self.image_keys.index_select(0, beam_idx.to(self.image_keys.device))
            self.image_values = self.image_values.index_select(0, beam_idx.to(self.image_values.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.rows_per_image *= repeats

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self.image_keys, self.image_values = self.keys[indices, ...], self.values[indices, ...]
            self.rows_per_image = 1

    def crop(self, tokens_to_remove: int) -> None:
        """The image tokens are never cropped: only the text (self-attention) cache is."""

    def offload(self) -> None:
        if self.is_initialized:
            self.image_keys = self.image_keys.to("cpu", non_blocking=True)
            self.image_values = self.image_values.to("cpu", non_blocking=True)

    def prefetch(self) -> None:
        if self.is_initialized and self.image_keys.device != self.device:
            self.image_keys = self.image_keys.to(self.device, non_blocking=True)
            self.image_values = self.image_values.to(self.device, non_blocking=True)


class ViTGPT2ImageCache(DynamicCache):
    """The cross-attention half of the model's `EncoderDecoderCache`: a `DynamicCache` of `ViTGPT2ImageLayer`s."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=ViTGPT2ImageLayer)


def _encoder_decoder_cache(cache: Cache | None) -> EncoderDecoderCache:
    """The cache this model decodes with: any self-attention cache (dynamic or static) with a `ViTGPT2ImageCache`."""
    if cache is None:
        return EncoderDecoderCache(DynamicCache(), ViTGPT2ImageCache())
    if not isinstance(cache, EncoderDecoderCache):
        return EncoderDecoderCache(cache, ViTGPT2ImageCache())
    if not isinstance(cache.cross_attention_cache, ViTGPT2ImageCache) and not any(cache.is_updated.values()):
        # `generate` builds a plain (dynamic or static) cross-attention cache; nothing is in it yet.
        cache.cross_attention_cache = ViTGPT2ImageCache()
    return cache


def _gets_one_adapter_per_row(module: nn.Module) -> bool:
    """Whether peft has hooked `module` for a mixed-adapter batch: its tuners pass `adapter_names` (one per input
    row) to the layer through a forward pre-hook while `generate(adapter_names=...)` or `forward` runs."""
    return any("adapter_names" in getattr(hook, "keywords", {}) for hook in module._forward_pre_hooks.values())


class ViTGPT2SelfAttention(nn.Module):
    """GPT-2's causal self-attention, with its fused query/key/value projection."""

    def __init__(self, config: ViTGPT2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.c_attn = Conv1D(3 * config.n_embd, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        prefix_keys: torch.Tensor | None,
        prefix_values: torch.Tensor | None,
        cache: EncoderDecoderCache | None,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows, length, width = hidden_states.shape
        heads_shape = (rows, length, self.num_heads, self.head_dim)
        query, key, value = (
            part.view(heads_shape).transpose(1, 2) for part in self.c_attn(hidden_states).split(width, dim=2)
        )
        if cache is not None:
            key, value = cache.self_attention_cache.update(key, value, self.layer_idx)
        if prefix_keys is not None:
            # The prefix stays out of the cache: training (with or without gradient checkpointing) and every decoding
            # step prepend the same learned vectors.
            key = torch.cat([prefix_keys.expand(rows, -1, -1, -1), key], dim=2)
            value = torch.cat([prefix_values.expand(rows, -1, -1, -1), value], dim=2)
        attend = _attention_function(self.config, output_attentions)
        output, weights = attend(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.config.attn_pdrop if self.training else 0.0,
            is_causal=attention_mask is None and length > 1,
        )
        output = self.resid_dropout(self.c_proj(output.reshape(rows, length, width)))
        return output, weights


class ViTGPT2CrossAttention(nn.Module):
    """Attention from the text to the image tokens; `c_attn` maps the encoder width straight to keys and values.

    The decoder may carry several rows per image (beams, sampled sequences): `rows` must be a multiple of the number
    of images, with each image's rows adjacent. Those rows' queries are stacked into one attention call against a
    single copy of the image's keys/values, which is exact (attention is independent per query) and avoids
    copying the image tokens once per beam.
    """

    def __init__(self, config: ViTGPT2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q_attn = Conv1D(config.n_embd, config.n_embd)
        self.c_attn = Conv1D(2 * config.n_embd, config.encoder_hidden_size)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def image_keys_values(
        self, image_tokens: torch.Tensor, rows: int, cache: EncoderDecoderCache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the image tokens, projected on the first call and then read back from the cache."""
        if cache is not None and cache.is_updated.get(self.layer_idx):
            cached = cache.cross_attention_cache.layers[self.layer_idx]
            if isinstance(cached, ViTGPT2ImageLayer):
                return cached.image_keys, cached.image_values
            return cached.keys, cached.values
        if rows > image_tokens.shape[0] and _gets_one_adapter_per_row(self.c_attn):
            # peft's mixed-adapter batches (`generate(adapter_names=...)`) name one adapter per decoder row, and a
            # LoRA on this projection must then see one input row per decoder row: each row gets its own copy.
            image_tokens = image_tokens.repeat_interleave(rows // image_tokens.shape[0], dim=0)
        images, tokens, _ = image_tokens.shape
        heads_shape = (images, tokens, self.num_heads, self.head_dim)
        key, value = (
            part.view(heads_shape).transpose(1, 2)
            for part in self.c_attn(image_tokens).split(self.config.n_embd, dim=2)
        )
        if cache is not None:
            cross = cache.cross_attention_cache
            while len(cross.layers) <= self.layer_idx:
                cross.layers.append(cross.layer_class_to_replicate())
            cross.layers[self.layer_idx].share(key, value, rows)
            cache.is_updated[self.layer_idx] = True
        return key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        image_tokens: torch.Tensor,
        cache: EncoderDecoderCache | None,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows, length, width = hidden_states.shape
        key, value = self.image_keys_values(image_tokens, rows, cache)
        images = key.shape[0]
        rows_per_image = rows // images
        query = self.q_attn(hidden_states).view(images, rows_per_image * length, self.num_heads, self.head_dim)
        attend = _attention_function(self.config, output_attentions)
        output, weights = attend(
            self,
            query.transpose(1, 2),
            key,
            value,
            None,
            scaling=self.scaling,
            dropout=self.config.attn_pdrop if self.training else 0.0,
            is_causal=False,
        )
        output = self.resid_dropout(self.c_proj(output.reshape(rows, length, width)))
        if weights is not None and rows_per_image > 1:
            # One row per decoder row, as transformers returns them (a regrouped copy; with one row per image the
            # weights are returned as computed, inside the autograd graph).
            weights = (
                weights.view(images, self.num_heads, rows_per_image, length, -1)
                .transpose(1, 2)
                .reshape(rows, self.num_heads, length, -1)
            )
        return output, weights


class ViTGPT2MLP(nn.Module):
    def __init__(self, config: ViTGPT2Config):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = Conv1D(inner, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, inner)
        self.act = ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


class ViTGPT2Adapter(nn.Module):
    """Bottleneck adapter (Houlsby et al. 2019): `x + up(act(down(x)))` on a sublayer's output."""

    def __init__(self, config: ViTGPT2Config):
        super().__init__()
        self.down = nn.Linear(config.n_embd, config.adapter_bottleneck)
        self.act = ACT2FN[config.activation_function]
        self.up = nn.Linear(config.adapter_bottleneck, config.n_embd)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.up(self.act(self.down(hidden_states)))


class ViTGPT2Prefix(nn.Module):
    """Learned keys/values that every block's self-attention sees before the caption (prefix tuning).

    They are prepended to the self-attention's keys/values at every call rather than written into the cache, so
    training (gradient checkpointing included, whose recomputation must not see them twice) and every `generate`
    call (cached or not, any number of beams, dynamic or static cache) see the same prefix; positions count from
    the caption's start.
    """

    def __init__(self, config: ViTGPT2Config):
        super().__init__()
        head_dim = config.n_embd // config.n_head
        self.keys_values = nn.Parameter(torch.zeros(config.n_layer, 2, config.n_head, config.prefix_length, head_dim))

    @property
    def length(self) -> int:
        return self.keys_values.shape[3]


class ViTGPT2Block(GradientCheckpointingLayer):
    """Self-attention, cross-attention (where configured) and MLP, each with its pre-norm and residual."""

    def __init__(self, config: ViTGPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = ViTGPT2SelfAttention(config, layer_idx)
        if config.has_cross_attention(layer_idx):
            self.ln_cross_attn = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
            self.crossattention = ViTGPT2CrossAttention(config, layer_idx)
        else:
            self.crossattention = None
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = ViTGPT2MLP(config)
        if config.adapter_bottleneck:
            self.attn_adapter = ViTGPT2Adapter(config)
            self.cross_adapter = ViTGPT2Adapter(config) if self.crossattention is not None else None
        else:
            self.attn_adapter = self.cross_adapter = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        image_tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prefix_keys: torch.Tensor | None = None,
        prefix_values: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        # Tensors that need gradients are positional (reentrant checkpointing tracks only those); `cache` is a
        # keyword so that gradient checkpointing can drop it.
        attended, self_weights = self.attn(
            self.ln_1(hidden_states), attention_mask, prefix_keys, prefix_values, cache, output_attentions
        )
        if self.attn_adapter is not None:
            attended = self.attn_adapter(attended)
        hidden_states = hidden_states + attended
        cross_weights = None
        if self.crossattention is not None:
            attended, cross_weights = self.crossattention(
                self.ln_cross_attn(hidden_states), image_tokens, cache, output_attentions
            )
            if self.cross_adapter is not None:
                attended = self.cross_adapter(attended)
            hidden_states = hidden_states + attended
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return hidden_states, self_weights, cross_weights


class ViTGPT2Encoder(nn.Module):
    """A timm ViT returning all its tokens (CLS first) after the final norm, as `BaseModelOutput`.

    A thin module rather than transformers' `TimmWrapperModel`, whose forward rejects the `output_attentions`
    argument that `generate` passes to every encoder. Per-block hidden states and attention weights are collected
    with hooks on timm's blocks, so any timm ViT whose blocks have an `attn.attn_drop` works unchanged.
    """

    main_input_name = "pixel_values"

    def __init__(self, config: ViTGPT2Config):
        super().__init__()
        self.model = timm.create_model(config.encoder_name, pretrained=False, num_classes=0, **config.encoder_kwargs)
        if config.encoder_layer_norm_eps is not None:
            # timm fixes the epsilon inside the architecture; a converted transformers ViT was trained with its own.
            for module in self.model.modules():
                if isinstance(module, nn.LayerNorm):
                    module.eps = config.encoder_layer_norm_eps
        if self.model.num_features != config.encoder_hidden_size:
            raise ValueError(
                f"encoder {config.encoder_name!r} makes {self.model.num_features}-d tokens but the config says "
                f"encoder_hidden_size={config.encoder_hidden_size}; set encoder_hidden_size to match."
            )
        patch_embed = getattr(self.model, "patch_embed", None)
        self.image_size = tuple(patch_embed.img_size) if patch_embed is not None else None
        self.accepts_any_size = bool(getattr(patch_embed, "dynamic_img_size", False))

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        expected = f"(batch, 3, {self.image_size[0]}, {self.image_size[1]})" if self.image_size else "(batch, 3, H, W)"
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(
                f"pixel_values must be a float tensor of shape {expected}, got {shape}. "
                "Prepare images with ViTGPT2Processor(images=...)."
            )
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values holds no images (batch size 0): pass at least one image")
        if self.image_size and not self.accepts_any_size and tuple(pixel_values.shape[-2:]) != self.image_size:
            raise ValueError(
                f"pixel_values must be {expected} for this encoder, got {tuple(pixel_values.shape)}. "
                "Prepare images with the processor saved with the model, which resizes them."
            )

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool = True,
    ) -> BaseModelOutput | tuple:
        self.check_pixel_values(pixel_values)
        parameter = next(self.model.parameters())
        pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
        if not (output_attentions or output_hidden_states):
            output = BaseModelOutput(last_hidden_state=self.model.forward_features(pixel_values))
            return output if return_dict else output.to_tuple()

        blocks = list(self.model.blocks)
        hidden_states, attentions, hooks = [], [], []
        if output_hidden_states:
            # The blocks' input (the embedded patches), then every block's output, as transformers' ViT returns them.
            hooks.append(blocks[0].register_forward_pre_hook(lambda module, args: hidden_states.append(args[0])))
            hooks.extend(
                block.register_forward_hook(lambda module, args, output: hidden_states.append(output))
                for block in blocks
            )
        fused = [block.attn.fused_attn for block in blocks]
        if output_attentions:
            # timm's unfused path computes softmax(q k^T) and passes it through `attn_drop` before multiplying the
            # values: the hook returns exactly the weights the block uses (still in the autograd graph).
            for block in blocks:
                block.attn.fused_attn = False
                hooks.append(
                    block.attn.attn_drop.register_forward_hook(lambda module, args, output: attentions.append(output))
                )
        try:
            tokens = self.model.forward_features(pixel_values)
        finally:
            for hook in hooks:
                hook.remove()
            for block, was_fused in zip(blocks, fused):
                block.attn.fused_attn = was_fused
        output = BaseModelOutput(
            last_hidden_state=tokens,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


class ViTGPT2PreTrainedModel(PreTrainedModel):
    config: ViTGPT2Config
    config_class = ViTGPT2Config
    # The decoder is the part a GPT-2 checkpoint fills (as `transformer` in GPT2LMHeadModel).
    base_model_prefix = "decoder"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["ViTGPT2Block"]
    _supports_sdpa = True
    _supports_attention_backend = True
    # Decoding steps run under `torch.compile(fullgraph=True)` with a static self-attention cache.
    _can_compile_fullgraph = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # The timm ViT's own tokens and positions (parameters of the ViT module itself, not of a layer), with timm's
        # scheme; pretrained weights replace them when loaded.
        if isinstance(getattr(module, "pos_embed", None), nn.Parameter):
            init.trunc_normal_(module.pos_embed, std=0.02)
        for name in ("cls_token", "reg_token"):
            if isinstance(getattr(module, name, None), nn.Parameter):
                init.normal_(getattr(module, name), std=1e-6)
        if isinstance(module, Conv1D):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        if isinstance(module, (ViTGPT2SelfAttention, ViTGPT2CrossAttention, ViTGPT2MLP)):
            # GPT-2's scheme: residual projections scaled by 1/sqrt(number of residual branches).
            branches = 2 * self.config.n_layer + len(
                [i for i in range(self.config.n_layer) if self.config.has_cross_attention(i)]
            )
            init.normal_(module.c_proj.weight, mean=0.0, std=self.config.initializer_range / branches**0.5)
        if isinstance(module, ViTGPT2Adapter):
            # A new adapter must start as the identity, so adding one does not change a pretrained model.
            init.zeros_(module.up.weight)
            init.zeros_(module.up.bias)
        if isinstance(module, ViTGPT2Prefix):
            init.normal_(module.keys_values, mean=0.0, std=self.config.initializer_range)


class ViTGPT2Decoder(ViTGPT2PreTrainedModel):
    """GPT-2's transformer (token and position embeddings, blocks, final norm) with cross-attention blocks: what
    `GPT2Model` is to GPT-2, the base model under the captioning head, taking the image tokens as
    `encoder_hidden_states`."""

    main_input_name = "input_ids"
    input_modalities = ("text",)

    def __init__(self, config: ViTGPT2Config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([ViTGPT2Block(config, layer_idx) for layer_idx in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.prefix = ViTGPT2Prefix(config) if config.prefix_length else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.wte = embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPastAndCrossAttentions | tuple:
        """input_ids `(rows, length)`; encoder_hidden_states `(images, image_tokens, encoder_hidden_size)` with
        `rows` a multiple of `images` (each image's rows adjacent); attention_mask `(rows, past + length)` or 4-D."""
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        image_tokens = encoder_hidden_states
        rows, length = input_ids.shape
        if rows % image_tokens.shape[0]:
            raise ValueError(
                f"{rows} decoder rows cannot share {image_tokens.shape[0]} images: the rows must be a whole number "
                "of rows per image (each image's rows adjacent)."
            )
        past_length = cache.get_seq_length() if cache is not None else 0
        if isinstance(past_length, int) and past_length + length > self.wpe.num_embeddings:
            raise ValueError(
                f"caption position {past_length + length - 1} is beyond the decoder's {self.wpe.num_embeddings} "
                "positions; lower max_length / max_new_tokens."
            )
        if attention_mask is not None and attention_mask.ndim == 2:
            # Left-padded prompts: count only real tokens, so every caption starts at position 0.
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        else:
            positions = (torch.arange(length, device=input_ids.device) + past_length).unsqueeze(0)
        hidden_states = self.drop(self.wte(input_ids) + self.wpe(positions))
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            cache=cache,
            allow_is_causal_skip=self.prefix is None,
        )
        prefix_keys = prefix_values = None
        if self.prefix is not None:
            if mask is not None:
                # Every caption token may see the whole prefix.
                mask = F.pad(mask, (self.prefix.length, 0), value=True if mask.dtype == torch.bool else 0.0)
            prefix_keys, prefix_values = self.prefix.keys_values.unbind(1)

        all_hidden, self_attentions, cross_attentions = [], [], []
        for layer_idx, block in enumerate(self.h):
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, self_weights, cross_weights = block(
                hidden_states,
                image_tokens,
                mask,
                prefix_keys[layer_idx] if prefix_keys is not None else None,
                prefix_values[layer_idx] if prefix_values is not None else None,
                cache=cache,
                output_attentions=output_attentions,
            )
            if output_attentions:
                self_attentions.append(self_weights)
                if cross_weights is not None:
                    cross_attentions.append(cross_weights)
        hidden_states = self.ln_f(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        output = BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(self_attentions) if output_attentions else None,
            cross_attentions=tuple(cross_attentions) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


class ViTGPT2LMHead(nn.Linear):
    """The vocabulary projection (GPT-2's tied `lm_head`), with a faster CPU kernel for inference.

    On CPU, BLAS computes `hidden @ weight.T` for the (vocabulary x width) weight much more slowly than the same
    product written `(weight @ hidden.T).T`, for the few rows of a beam-search step and for large batches alike (the
    figures are in benchmarks/README.md). The projection streams the whole vocabulary weight at every decoding step,
    so this is most of what a step costs. Only float32 takes this path: in bf16/fp16 `F.linear` is the faster one.
    Training keeps `F.linear` too, so its backward pass is unchanged; on GPUs both forms run the same cuBLAS kernels.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        inference_on_cpu = hidden_states.device.type == "cpu" and not torch.is_grad_enabled()
        if not inference_on_cpu or self.weight.dtype != torch.float32 or self.bias is not None:
            return super().forward(hidden_states)
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = (self.weight @ rows.T).T.contiguous()
        return logits.reshape(*hidden_states.shape[:-1], self.out_features)


class ViTGPT2ForConditionalGeneration(ViTGPT2PreTrainedModel, GenerationMixin):
    """Image captioning: `generate(pixel_values=...)` writes captions; `forward(..., labels=...)` returns the loss."""

    _tied_weights_keys = {"lm_head.weight": "decoder.wte.weight"}

    def __init__(self, config: ViTGPT2Config):
        super().__init__(config)
        self.encoder = ViTGPT2Encoder(config)
        self.decoder = ViTGPT2Decoder(config)
        self.lm_head = ViTGPT2LMHead(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_encoder(self, modality: str | None = None) -> ViTGPT2Encoder:
        return self.encoder if modality in (None, "image") else super().get_encoder(modality)

    def get_decoder(self) -> ViTGPT2Decoder:
        return self.decoder

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.wte

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.decoder.wte = embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, embeddings: nn.Linear) -> None:
        self.lm_head = embeddings

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Callable = checkpoint,
                                    every_n_layers: int = 1) -> None:
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)
        # timm's blocks carry no flag transformers could set: a trained encoder is checkpointed by timm's own switch.
        self.encoder.model.set_grad_checkpointing(enable)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: Cache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> Seq2SeqLMOutput | tuple:
        r"""
        pixel_values (`(images, 3, H, W)`): images prepared by `ViTGPT2Processor`; or pass `encoder_outputs`.
        decoder_input_ids (`(rows, length)`): `[start] + caption tokens`; derived from `labels` when omitted. `rows`
            may be a multiple of `images` (several captions per image, each image's rows adjacent).
        decoder_attention_mask: `(rows, past + length)` padding mask (1 = real token), or a prepared 4-D mask.
        cache: an `EncoderDecoderCache` from an earlier call (any self-attention cache; the cross-attention half
            keeps one copy of each image's keys/values), or a self-attention `Cache` to start from.
        labels (`(rows, length)`): `caption tokens + [end]`, -100 where no loss is wanted; aligned with the logits.
        num_items_in_batch: the number of label tokens in the whole (accumulated) batch, from `Trainer`, so the loss
            is their mean across gradient-accumulation steps rather than a mean of per-step means.
        past_key_values: the former name of `cache`, still accepted (with a deprecation warning).
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if encoder_outputs is None:
            if pixel_values is None:
                raise ValueError("pass `pixel_values` (from ViTGPT2Processor) or precomputed `encoder_outputs`")
            encoder_outputs = self.encoder(
                pixel_values, output_attentions=output_attentions, output_hidden_states=output_hidden_states
            )
        elif isinstance(encoder_outputs, (tuple, list)):
            encoder_outputs = BaseModelOutput(
                last_hidden_state=encoder_outputs[0],
                hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
                attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
            )
        # Cached features may be stored in half precision; the decoder computes in its own dtype.
        image_tokens = encoder_outputs.last_hidden_state.to(self.decoder.wte.weight.dtype)

        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass `decoder_input_ids` (start token + caption) or `labels` to derive them from")
            decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache or cache is not None:
            cache = _encoder_decoder_cache(cache)

        decoded = self.decoder(
            decoder_input_ids,
            image_tokens,
            attention_mask=decoder_attention_mask,
            cache=cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.lm_head(decoded.last_hidden_state)

        loss = None
        if labels is not None:
            token_losses = F.cross_entropy(
                logits.float().flatten(0, 1), labels.to(logits.device).flatten(), ignore_index=-100, reduction="sum"
            )
            count = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum()
            loss = token_losses / count

        output = Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=cache if use_cache else None,
            decoder_hidden_states=decoded.hidden_states,
            decoder_attentions=decoded.attentions,
            cross_attentions=decoded.cross_attentions,
            encoder_last_hidden_state=image_tokens,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


    @classmethod
    def from_encoder_decoder_pretrained(
        cls,
        encoder: str | os.PathLike,
        decoder: str | os.PathLike,
        output_loading_info: bool = False,
        **config_overrides,
    ):
        """Builds the captioner from a pretrained timm ViT and a pretrained GPT-2; only cross-attention is new.

        encoder: a timm name with its pretrained tag (`"vit_large_patch14_clip_224.openai"`), an `"hf-hub:timm/..."`
            id, or a local weights file (`.safetensors`/`.pth`) for the architecture named by `encoder_name=`.
        decoder: a GPT-2 Hub id (`"openai-community/gpt2"`) or a local folder saved with `save_pretrained`.
        config_overrides: any `ViTGPT2Config` field (`encoder_kwargs`, `cross_attention_layers`, dropouts, ...).

        The newly initialised weights (exactly the cross-attention ones) are logged, and returned with
        `output_loading_info=True` as `(model, {"newly_initialized": [...]})`.
        """
        from transformers import GPT2LMHeadModel

        encoder_kwargs = dict(config_overrides.pop("encoder_kwargs", None) or {})
        architecture = config_overrides.pop("encoder_name", ViTGPT2Config().encoder_name)
        if Path(encoder).is_file():
            timm_model = timm.create_model(
                architecture, pretrained=True, pretrained_cfg_overlay={"file": str(encoder)}, num_classes=0,
                **encoder_kwargs,
            )
        else:
            timm_model = timm.create_model(str(encoder), pretrained=True, num_classes=0, **encoder_kwargs)
            pretrained_cfg = timm_model.pretrained_cfg
            tag = pretrained_cfg.get("tag")
            architecture = pretrained_cfg["architecture"] + (f".{tag}" if tag else "")
        gpt2 = GPT2LMHeadModel.from_pretrained(decoder)
        gpt2_config = gpt2.config
        end_of_text = gpt2_config.eos_token_id
        decoder_fields = decoder_fields_from_gpt2(gpt2_config) | {
            "bos_token_id": end_of_text,
            "eos_token_id": end_of_text,
            "pad_token_id": end_of_text,
            "decoder_start_token_id": end_of_text,
        }
        config = ViTGPT2Config(
            encoder_name=architecture,
            encoder_kwargs=encoder_kwargs,
            encoder_hidden_size=timm_model.num_features,
            **(decoder_fields | config_overrides),
        )
        model = cls(config)
        model.encoder.model.load_state_dict(timm_model.state_dict())
        decoder_state = {
            name.removeprefix("transformer."): weight
            for name, weight in gpt2.state_dict().items()
            if name.startswith("transformer.")
        }
        missing, unexpected = model.decoder.load_state_dict(decoder_state, strict=False)
        if unexpected:
            raise ValueError(f"decoder {decoder!r} has weights this GPT-2 decoder does not: {unexpected}")
        newly_initialized = [f"decoder.{name}" for name in missing]
        logger.warning(
            f"Newly initialised (not in {decoder!r}; train them): {len(newly_initialized)} tensors of the "
            f"cross-attention: {newly_initialized}"
        )
        model.generation_config.update(**CAPTION_GENERATION_DEFAULTS)
        model.config._name_or_path = f"{architecture}+{decoder}"
        return (model, {"newly_initialized": newly_initialized}) if output_loading_info else model

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False, **model_kwargs):
        # Beams and sampled sequences share their image: leave the encoder output at one row per image, where
        # `generate` would copy it once per row (the cross-attention groups each image's rows instead).
        encoder_outputs = model_kwargs.pop("encoder_outputs", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=False, **model_kwargs
        )
        if encoder_outputs is not None:
            model_kwargs["encoder_outputs"] = encoder_outputs
        return input_ids, model_kwargs

    def _prepare_special_tokens(self, generation_config, kwargs_has_attention_mask=None, device=None, batch_size=None):
        # The "pad token is the end token, pass an attention_mask" warning is about padded text inputs; images are
        # never padded, so a batch of them needs no mask.
        return super()._prepare_special_tokens(generation_config, None, device=device, batch_size=batch_size)

    def _activation_checkpointing_enable(self, *args, **kwargs):
        super()._activation_checkpointing_enable(*args, **kwargs)
        # transformers does this for text models (main input `input_ids`); ours is `pixel_values`, but the checkpointed
        # blocks are the decoder's: with frozen embeddings (every PEFT method) reentrant checkpointing would otherwise
        # see no input that needs gradients and drop the adapters' gradients.
        self.enable_input_require_grads()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if model_kwargs.get("cache") is not None:
            # Whatever self-attention cache `generate` chose (dynamic, static, offloaded), the cross-attention half
            # keeps one copy of each image's keys/values for all of its rows.
            model_kwargs["cache"] = _encoder_decoder_cache(model_kwargs["cache"])


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Teacher-forcing inputs from labels: `[start] + labels[:-1]`, with -100 replaced by the pad token."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


