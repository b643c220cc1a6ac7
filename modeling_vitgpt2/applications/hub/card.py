"""The model card of a train.py output folder, rendered from the run's results with `huggingface_hub.ModelCard` and
a Jinja template (package data, so wheel installs render cards too; `model_card/template.md` at the top of the
checkout is a link to it, the one copy people edit)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import timm
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ...evaluation.metrics import format_metric, metric_names
from ...training.peft_methods import peft_method
from ...utils.io import read_json
from .output_folder import ATTENTION_EXAMPLE, TrainingOutput, is_hub_id, read_output, read_required_json

__all__ = ["build_model_card", "recorded_base_models", "render_card"]

TEMPLATE_RESOURCE = "model_card_template.md"
# transformers' `GenerationConfig` defaults for the settings the card states: what `generate` falls back to.
GENERATION_DEFAULTS = {"num_beams": 1, "do_sample": False, "max_length": 20}


def build_model_card(
    output_dir: str | Path,
    repo_id: str | None = None,
    dataset_name: str | None = None,
    license: str = "apache-2.0",
    base_models: list[str] | None = None,
    template_path: str | Path | None = None,
    space_id: str | None = None,
) -> ModelCard:
    """The model card of a train.py output folder: metadata (library, pipeline, base models, datasets, tags,
    license) with a `model-index` of its CIDEr (and CLIPScore), then architecture, method, hyperparameters, data,
    usage, attention picture and limitations.

    repo_id: the repository the snippets load from (`namespace/name`); a placeholder when not given.
    dataset_name: the Hub id of the training/validation data; default: the one the run recorded, if any.
    base_models: Hub ids of what the model was built from; default: an adapter's Hub base, or the encoder, decoder or
        model the run recorded (never a local path).
    template_path: a Jinja card template of your own; default: the packaged `model_card/template.md`.
    space_id: a Space running the demo page for this model (`push_space`); the card links it.
    """
    return render_card(read_output(output_dir), repo_id, dataset_name, license, base_models, template_path,
                        space_id)



def render_card(
    output: TrainingOutput,
    repo_id: str | None,
    dataset_name: str | None,
    license: str,
    base_models: list[str] | None,
    template_path: str | Path | None,
    space_id: str | None = None,
) -> ModelCard:
    method = peft_method(output.method)  # the registered record: title, tag and what trained
    # What the run started from, as train.py records it in training_summary.json (absent from older runs).
    sources = output.summary.get("sources", {})
    dataset_name = dataset_name or (sources.get("dataset_name") if is_hub_id(sources.get("dataset_name")) else None)
    synthetic_data = bool(sources.get("synthetic_data"))
    if dataset_name:
        dataset_type, dataset_label = dataset_name, dataset_name
        dataset_description = f"[`{dataset_name}`](https://huggingface.co/datasets/{dataset_name})"
    elif synthetic_data:
        dataset_type, dataset_label = "synthetic-shapes", "Synthetic shapes"
        dataset_description = "the built-in synthetic set of `train.py` (coloured shapes with templated captions)"
    else:
        dataset_type, dataset_label = "custom", "Local validation set"
        dataset_description = "a local dataset (not published on the Hub)"

    metrics = [{"name": display, "type": key, "value": output.eval_results[f"eval_{key}"],
                "text": format_metric(key, output.eval_results[f"eval_{key}"])}
               for key, display in metric_names().items() if f"eval_{key}" in output.eval_results]
    model_name = repo_id.split("/")[-1] if repo_id else output.folder.name
    card_data = ModelCardData(
        model_name=model_name,
        library_name="peft" if output.is_adapter else "transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_models if base_models is not None else recorded_base_models(output, sources) or None,
        datasets=[dataset_name] if dataset_name else None,
        license=license,
        tags=["image-captioning", "vision", "vit", "gpt2", "timm", "vitgpt2"]
        + [tag for tag in [method.tag] if tag],
        eval_results=[
            EvalResult(
                task_type="image-to-text",
                dataset_type=dataset_type,
                dataset_name=dataset_label,
                dataset_split="validation",
                metric_type=metric["type"],
                metric_name=metric["name"],
                metric_value=round(metric["value"], 4),
            )
            for metric in metrics
        ],
    )
    model_folder = output.model_folder
    return ModelCard.from_template(
        card_data,
        template_str=_read_template(template_path),
        model_name=model_name,  # ModelCardData moves it into the model-index, out of the template's variables
        repo_id=repo_id or f"<your-namespace>/{model_name}",
        is_adapter=output.is_adapter,
        base_bundled=output.is_adapter and model_folder is not None,
        base_repo=output.base_repo,
        peft_method=output.method,
        method_title=method.title,
        method_description=method.describe(output.summary.get("peft", {})),
        peft=output.summary.get("peft", {}),
        summary=output.summary,
        config=read_required_json(model_folder / "config.json") if model_folder else None,
        generation=_generation_settings(model_folder) if model_folder else None,
        training_data=_training_data(output.summary),
        eval_images=_count(output.summary.get("eval_images")),
        dataset_description=dataset_description,
        synthetic_data=synthetic_data,
        metrics=metrics,
        has_clip_score="eval_clip_score" in output.eval_results,
        attention_example=ATTENTION_EXAMPLE if (output.folder / ATTENTION_EXAMPLE).is_file() else None,
        space_id=space_id,
    )


def _read_template(template_path: str | Path | None) -> str:
    if template_path is not None:
        return Path(template_path).read_text(encoding="utf-8")
    return resources.files(__package__).joinpath(TEMPLATE_RESOURCE).read_text(encoding="utf-8")


def recorded_base_models(output: TrainingOutput, sources: dict) -> list[str]:
    """Hub ids the model was built from: an adapter's Hub base, else what the run recorded starting from."""
    if output.base_repo:
        return [output.base_repo]
    candidates = [sources.get("model_name_or_path"), _timm_hub_id(sources.get("encoder")), sources.get("decoder")]
    return [name for name in candidates if is_hub_id(name)]


def _timm_hub_id(encoder: str | None) -> str | None:
    """`vit_large_patch14_clip_224.openai` -> `timm/vit_large_patch14_clip_224.openai`; None for a local file."""
    if not encoder or Path(encoder).exists():
        return None
    if encoder.startswith("hf-hub:"):
        return encoder.removeprefix("hf-hub:")
    return timm.models.get_pretrained_cfg(encoder).hf_hub_id


def _generation_settings(model_folder: Path) -> dict | None:
    """generation_config.json, with what `generate` uses for a field the file leaves out (or sets to null):
    transformers' `GenerationConfig` defaults (greedy search, at most 20 tokens), not a blank on the card."""
    path = model_folder / "generation_config.json"
    if not path.is_file():
        return None
    return {**GENERATION_DEFAULTS, **{name: value for name, value in read_json(path).items() if value is not None}}


def _training_data(summary: dict) -> str:
    """What the model was trained on, for the card's Data section. A streamed run (--streaming, --train_shards)
    has no length, so train.py records `train_captions: null` and counts in its `stream` section what it read."""
    captions = _count(summary.get("train_captions"))
    if captions:
        return f"{captions} captions"
    stream = summary.get("stream") or {}
    samples = _count(stream.get("used_samples"))
    if not samples:  # not counted (with dataloader workers) or an older run
        return "a streamed dataset"
    resumed = stream.get("counted_from_step")
    return f"a stream of {samples} image-caption samples" + (
        f" (counted from step {resumed}, where the run resumed)" if resumed else "")


def _count(value) -> str | None:
    """`1,234`, or None for a count the run did not record."""
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else None
