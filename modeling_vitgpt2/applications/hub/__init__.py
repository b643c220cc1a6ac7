"""Publishing a `train.py` output folder to the Hugging Face Hub: a model card rendered from the run's results, and
one commit holding what loading the model needs.

    python -m modeling_vitgpt2.applications.hub card outputs/lora                             # print the card
    python -m modeling_vitgpt2.applications.hub push outputs/lora --repo_id you/vitgpt2-lora  # [--private] [--include_checkpoints]
    python train.py ... --push_to_hub --hub_model_id you/vitgpt2-lora            # the same push, after training
    python -m modeling_vitgpt2.applications.hub space you/vitgpt2-lora --repo_id you/vitgpt2-demo  # the demo page as a Space

What goes up:
- full runs: config.json (with `auto_map`), the weights, generation_config.json, the configuration/modeling/processing
  source files that `save_pretrained` copied (so `trust_remote_code=True` works without this package), the processor;
- PEFT runs: adapter_config.json, adapter_model.safetensors, the processor (with its source file). An adapter's base
  that exists only on this machine (the `base_model/` folder a run writes when it builds its base, or any other local
  folder) is uploaded inside the repository as `base_model/`, with its own code, and the uploaded adapter_config.json
  names the repository instead of the local path; a base that is already on the Hub is only referred to;
- always: the rendered card as README.md (never peft's generic one), eval_results.json, training_summary.json (its
  local paths cut to their base names), train_results.json, all_results.json, eval_predictions.json, and
  attention_example.png when the folder has one;
- never optimizer/scheduler/RNG states, trainer_state.json or checkpoint-* folders, unless `include_checkpoints`.

The upload is one `HfApi.create_commit` made of `CommitOperationAdd`s, rather than `upload_folder` of a staging copy:
every file is read from where it lies (no second copy of gigabytes of weights on disk), the generated files (the
card, a rewritten adapter_config.json and training_summary.json) are passed as bytes, so the output folder is never
written to, and the list of operations is exactly what lands in the repository. Files already in the repository and not in this push stay.

A Space (`push_space`) is one commit too: `app.py` (the demo page, `modeling_vitgpt2/applications/demo.py`), this package's source
under `modeling_vitgpt2/`, a `requirements.txt` pinning every dependency to the version installed here (the tested
one; Gradio is pinned by the README's `sdk_version`), and a README whose Space metadata names the model repository
(`models:`), which the page loads. A local output folder instead goes up inside the Space, as `model/`.
"""

from .card import build_model_card
from .command import main
from .push import (
    HubPushError,
    check_push_settings,
    push_to_hub,
    push_training_output,
    refuse_files_with_token,
    require_hub_token,
    without_trainer_push,
)
from .space import push_space, space_requirements

__all__ = [
    "HubPushError",
    "build_model_card",
    "check_push_settings",
    "main",
    "push_space",
    "push_to_hub",
    "push_training_output",
    "refuse_files_with_token",
    "require_hub_token",
    "space_requirements",
    "without_trainer_push",
]
