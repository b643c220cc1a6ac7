"""Configuration of ViTGPT2: a timm ViT encoder feeding a GPT-2 decoder through cross-attention."""

from __future__ import annotations

from transformers import PretrainedConfig

__all__ = ["ViTGPT2Config", "decoder_fields_from_gpt2"]


GPT2_END_OF_TEXT = 50256


class ViTGPT2Config(PretrainedConfig):
    r"""
    Configuration for [`ViTGPT2ForConditionalGeneration`].

    Encoder arguments:
        encoder_name (`str`): timm architecture, optionally with its pretrained tag (`"vit_large_patch14_clip_224.openai"`).
            Only the architecture is built from it; weights come from `from_pretrained` or
            `from_encoder_decoder_pretrained`.
        encoder_kwargs (`dict`): extra `timm.create_model` arguments (`img_size`, `patch_size`, `embed_dim`, ...).
        encoder_hidden_size (`int`): width of the image tokens (1024 for ViT-L/14); checked against the built encoder.
        encoder_layer_norm_eps (`float`, *optional*): epsilon of every LayerNorm in the encoder; `None` keeps the
            timm architecture's own (1e-6 for ViTs). Converted transformers ViTs set theirs (usually 1e-12).

    Decoder arguments (GPT-2's names, so GPT-2 checkpoints and peft read them unchanged):
        vocab_size, n_positions, n_embd, n_layer, n_head, n_inner, activation_function, resid_pdrop, embd_pdrop,
        attn_pdrop, layer_norm_epsilon, initializer_range.
        cross_attention_layers (`list[int]`, *optional*): decoder blocks that carry cross-attention; `None` = all.

    Parameter-efficient modules built into the decoder (trained by `modeling_vitgpt2.training.peft_methods`):
        adapter_bottleneck (`int`, *optional*): bottleneck adapters (Houlsby et al.) of this width after the
            self-attention and after the cross-attention of every block; their up-projection starts at zero, so a
            new adapter leaves the model's outputs unchanged.
        prefix_length (`int`): learned key/value vectors prepended to every block's self-attention (prefix tuning,
            Li & Liang 2021), in training and in generation alike; 0 = none.

    Special tokens default to GPT-2's `<|endoftext|>` (50256) as start, end and padding.
    """

    model_type = "vitgpt2"
    attribute_map = {
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
        "max_position_embeddings": "n_positions",
    }

    def __init__(
        self,
        encoder_name: str = "vit_large_patch14_clip_224.openai",
        encoder_kwargs: dict | None = None,
        encoder_hidden_size: int = 1024,
        encoder_layer_norm_eps: float | None = None,
        vocab_size: int = 50257,
        n_positions: int = 1024,
        n_embd: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        n_inner: int | None = None,
        activation_function: str = "gelu_new",
        resid_pdrop: float = 0.1,
        embd_pdrop: float = 0.1,
        attn_pdrop: float = 0.1,
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        cross_attention_layers: list[int] | None = None,
        adapter_bottleneck: int | None = None,
        prefix_length: int = 0,
        bos_token_id: int = GPT2_END_OF_TEXT,
        eos_token_id: int = GPT2_END_OF_TEXT,
        pad_token_id: int = GPT2_END_OF_TEXT,
        decoder_start_token_id: int = GPT2_END_OF_TEXT,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        **kwargs,
    ):
        self.encoder_name = encoder_name
        self.encoder_kwargs = dict(encoder_kwargs or {})
        self.encoder_hidden_size = encoder_hidden_size
        self.encoder_layer_norm_eps = encoder_layer_norm_eps
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_inner = n_inner
        self.activation_function = activation_function
        self.resid_pdrop = resid_pdrop
        self.embd_pdrop = embd_pdrop
        self.attn_pdrop = attn_pdrop
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        if cross_attention_layers is not None:
            cross_attention_layers = sorted(set(int(layer) for layer in cross_attention_layers))
            out_of_range = [layer for layer in cross_attention_layers if not 0 <= layer < n_layer]
            if out_of_range:
                raise ValueError(f"cross_attention_layers {out_of_range} are outside the decoder's 0..{n_layer - 1}")
        self.cross_attention_layers = cross_attention_layers
        self.adapter_bottleneck = adapter_bottleneck
        self.prefix_length = prefix_length
        self.use_cache = use_cache
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        kwargs.setdefault("is_encoder_decoder", True)
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            decoder_start_token_id=decoder_start_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def has_cross_attention(self, layer_idx: int) -> bool:
        return self.cross_attention_layers is None or layer_idx in self.cross_attention_layers


def decoder_fields_from_gpt2(gpt2_config) -> dict:
    """The `ViTGPT2Config` decoder fields a transformers `GPT2Config` sets (the one place they are mapped), so a
    decoder built from a GPT-2 checkpoint has its sizes, dropouts and initialisation."""
    names = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
             "resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range")
    return {name: getattr(gpt2_config, name) for name in names}
