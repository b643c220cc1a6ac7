"""The tokenizer of a captioner trained from scratch: a small byte-level BPE trained on its training captions."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Tokenizer, PreTrainedTokenizerFast

__all__ = ["END_OF_TEXT", "train_caption_tokenizer"]

END_OF_TEXT = "<|endoftext|>"


def train_caption_tokenizer(
    captions: Iterable[str],
    vocab_size: int = 1000,
    save_dir: str | Path | None = None,
) -> PreTrainedTokenizerFast:
    """Trains a small byte-level BPE on `captions` and wraps it as a GPT-2 tokenizer.

    Like GPT-2, its only special token is `<|endoftext|>`, which serves as bos, eos, unk and pad; the tokenizer adds
    no special tokens by itself (the processor puts them around captions). The vocabulary is the 256 byte symbols,
    `<|endoftext|>` and the merges, at most `vocab_size` in all; BPE stops earlier once every frequent word is a
    single token. With `save_dir`, it is also saved there for `AutoTokenizer.from_pretrained(save_dir)`.
    """
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(
        captions, vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_TEXT], show_progress=False
    )
    # Rebuilding from vocab + merges gives the real GPT2Tokenizer class (pre-tokenizer, decoder, special tokens and
    # tokenizer_config.json exactly as GPT-2's), so code written for GPT-2 treats it the same way.
    model_state = json.loads(bpe.to_str())["model"]
    tokenizer = GPT2Tokenizer(
        vocab=model_state["vocab"],
        merges=[tuple(merge) for merge in model_state["merges"]],
        pad_token=END_OF_TEXT,
    )
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer
