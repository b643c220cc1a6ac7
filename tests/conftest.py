"""Shared test set-up: everything runs offline on tiny models built from configs."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real reference data beside the checkout (`../shared/data`); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real reference data not found at {SHARED_DATA}")
    return SHARED_DATA


import torch  # noqa: E402

TINY_CAPTIONS = [
    "a red circle on the left",
    "a small blue square at the top",
    "two green triangles next to a yellow star",
    "a dog running on the grass",
    "a couple of boats in a large body of water",
    "a view of a mountain with a tree",
]


def build_tiny_tokenizer(save_dir: Path):
    """A byte-level BPE tokenizer shaped like GPT-2's (`<|endoftext|>` is start, end and pad), trained offline."""
    from modeling_vitgpt2.synthetic import train_caption_tokenizer

    return train_caption_tokenizer(TINY_CAPTIONS * 4, vocab_size=300, save_dir=save_dir)


def tiny_config_kwargs(tokenizer, **overrides):
    """A ViT (28 px, 2x2 patches of 14 px, 48-d tokens) feeding a 2-layer, 32-wide GPT-2: encoder and decoder
    widths differ on purpose, so the cross-attention key/value projection really maps one to the other."""
    end = tokenizer.eos_token_id
    kwargs = dict(
        encoder_name="vit_base_patch16_224",
        encoder_kwargs=dict(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=2),
        encoder_hidden_size=48,
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
        decoder_start_token_id=end,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_processor(tiny_tokenizer):
    import timm

    from modeling_vitgpt2 import ViTGPT2Processor

    encoder = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=28, patch_size=14,
                                embed_dim=48, depth=1, num_heads=2)
    return ViTGPT2Processor.from_timm_model(encoder, tiny_tokenizer)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration

    torch.manual_seed(0)
    return ViTGPT2ForConditionalGeneration(ViTGPT2Config(**tiny_config_kwargs(tiny_tokenizer))).eval()


@pytest.fixture(scope="session")
def real_photos(shared_data) -> list[Path]:
    folder = shared_data / "real_images"
    return [folder / "git_examples" / "1.jpg", folder / "git_examples" / "2.jpg", folder / "skimage" / "astronaut.png"]
