"""Run a whole PEFT study in one command and write one report: fine-tune a base captioner with several methods,
score every variant with the metric registry, compare CLIP prompt templates, and draw the best and worst captions'
attention maps.

    vitgpt2 study                                   # the built-in offline study (synthetic set)
    vitgpt2 study configs/studies/course_peft.yaml --output_dir outputs/course-study

A study is a YAML file (see `configs/studies/` and the built-in
`modeling_vitgpt2/applications/studies/synthetic_peft.yaml`):

    name: my-study
    base: {model: outputs/synthetic-default, train_config: default}
          # or {model: <Hub id or folder>}, or {encoder: <timm name>, decoder: <GPT-2 id>}; train_config trains a
          # missing base folder first, into `model`: "default" is train.py's default job, else a train.py YAML
    data: {train_json: ..., train_images: ..., val_json: ..., val_images: ...}   # or synthetic_* options
    recipe: {learning_rate: 0.001, num_train_epochs: 3, ...}                     # any train.py argument
    variants:                                                                    # each: a name and overrides
      - {name: lora_r4, peft: lora, lora_rank: 4}
      - {name: full, peft: full}
    clip_model: openai/clip-vit-base-patch32      # optional: CLIPScore, extremes by CLIPScore, zero-shot
    metrics: [cider, bleu, rouge_l, meteor, clip_score, diversity, copied]      # optional: default all; cider,
                                                  # or clip_score with a clip_model, ranks the best/worst captions
    zero_shot: {images: p1_data/val, labels: p1_data/id2label.json, templates: [...], ensemble: true}
          # optional labels_file and clip_model; paths are relative to where the study runs
    torch_threads: 1                              # optional: CPU threads for torch (default: torch's choice)
    extremes: {variant: lora_r4, top_k: 2, layer: [2, 3]}   # default: the best variant by CIDEr, top 2, the
                                                  # report's 3rd-4th decoder layers (all layers if it has fewer)
    side_by_side: 4                               # validation images shown with every variant's caption

What it guarantees:
- A mistake in the study file stops it before anything runs, naming the file and the field (`load_study`); each
  row's train.py arguments are parsed as train.py parses its config file, so they accept the same values.
- Frozen-encoder variants share one encoder-feature cache (`<output_dir>/feature-cache`, keyed by the encoder's
  weights), so the encoder runs once per image for the whole study, base-model evaluation included.
- Resumable: each finished variant leaves `<output_dir>/variants/<name>/study_result.json` and is skipped on a rerun;
  an interrupted one resumes from its last complete checkpoint. A failing variant is reported with its error and the
  others still run; a rerun retries it. A rerun whose study file changed only how rows are scored (metrics,
  clip_model, clip_prefix) rescores the finished rows' saved predictions instead of retraining them.
- Studies may share a `synthetic_dir`: one writes the set while the others wait, then reuse it.
- Every number in the report is `eval.py score` (`evaluation.score_predictions`) on that variant's saved
  predictions (`variants/<name>/eval_predictions.json`), written beside them as `scores.json`.
"""

from .command import main
from .config import BASE_ROW, BUILTIN_STUDY, STUDY_KEYS, Study, StudyConfigError, load_study
from .report import TABLE_METRICS, write_report
from .run import RESULT_FILE, RUN_DEFAULTS, StudyData, StudyProgress, ensure_base_model, run_study, run_variant

__all__ = [
    "BASE_ROW",
    "BUILTIN_STUDY",
    "ensure_base_model",
    "load_study",
    "main",
    "RESULT_FILE",
    "RUN_DEFAULTS",
    "run_study",
    "run_variant",
    "Study",
    "STUDY_KEYS",
    "StudyConfigError",
    "StudyData",
    "StudyProgress",
    "TABLE_METRICS",
    "write_report",
]
