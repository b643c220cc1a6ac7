"""The one place `generate`'s keyword arguments are assembled: training's validation captions, the caption and
attention-map jobs, the study and the demo all ask for captions through `generation_kwargs`."""

from __future__ import annotations

__all__ = ["generation_kwargs"]


def generation_kwargs(num_beams: int | None = None, max_length: int | None = None,
                      max_new_tokens: int | None = None, **other) -> dict:
    """The keyword arguments of `generate` for these settings. A setting left at None is left out, so that the
    model's `generation_config.json` decides it (an explicit None would override it and break `generate`);
    `max_new_tokens` takes precedence over `max_length`, as in `generate`. `other` settings (`length_penalty`, ...)
    pass through the same way."""
    settings = {"num_beams": num_beams, "max_length": max_length, "max_new_tokens": max_new_tokens, **other}
    return {name: value for name, value in settings.items() if value is not None}
