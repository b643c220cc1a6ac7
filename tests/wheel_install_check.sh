#!/usr/bin/env bash
# The package as users install it, with the newest releases its ranges allow: build the wheel, install it into a
# fresh virtual environment WITHOUT tests/constraints.txt (torch from the same local package cache as the tests),
# print the releases that resolved, and run the package's own fast checks from a folder outside the checkout, so
# that nothing can come from the source tree: through the `vitgpt2` console command, a few training steps,
# `eval caption` (also `--quantize int8-compiled`, with its extra) and `score`, the Hub model card and the built-in
# study's first variant (its config read from the installed package data); then a load through
# AutoModelForImageTextToText with remote code and a short beam-search `generate`. The
# vendored transformers/peft suites are not run here: they are one exact release's files (tests/constraints.txt
# pins it for the main suite). When a new release breaks the package, the check fails naming the releases that
# differ from the pinned ones; fix the code, or cap the range in pyproject.toml and say why there.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
started=$SECONDS
step() { echo "[wheel-check $((SECONDS - started)) s] $*"; }

step "building the wheel from a copy of the sources"
mkdir "$work/src"
cp "$repo/pyproject.toml" "$repo/README.md" "$work/src/"
cp -r "$repo/modeling_vitgpt2" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
python -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$work/dist" "$work/src"
wheel="$(ls "$work"/dist/modeling_vitgpt2-*.whl)"

step "installing $(basename "$wheel") with the newest releases its ranges allow into a fresh virtual environment"
python -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --upgrade torch==2.14.1 torchvision==0.29.1 "$wheel"
py="$work/venv/bin/python"
# The same freeze that wrote tests/constraints.txt, of this environment: the releases not in the pins are the
# suspects when a check below fails.
"$py" "$repo/tests/freeze_constraints.py" | grep -v '^#' > "$work/resolved.txt"
newer="$(grep -vxFf "$repo/tests/constraints.txt" "$work/resolved.txt" | tr "\n" " " || true)"
step "newest releases: $(grep -E '^(torch|torchvision|transformers|peft|accelerate|timm|datasets|evaluate|huggingface-hub|safetensors|tokenizers|torchdata)==' "$work/resolved.txt" | tr '\n' ' ')"
step "differing from tests/constraints.txt: ${newer:-none}"
trap 'status=$?; if [ $status -ne 0 ]; then echo "wheel check FAILED (see the last step above) with the newest releases; differing from tests/constraints.txt: ${newer:-none}" >&2; fi; rm -rf "$work"' EXIT

step "running the console command from outside the checkout"
mkdir "$work/user"
cd "$work/user"
export HF_HUB_OFFLINE=1 PYTHONPATH= OMP_NUM_THREADS=1
vitgpt2="$work/venv/bin/vitgpt2"
"$py" -c 'import modeling_vitgpt2, sys; assert modeling_vitgpt2.__file__.startswith(sys.prefix), modeling_vitgpt2.__file__'
"$vitgpt2" train --help > help.txt
grep -q -- "--max_new_tokens" help.txt
"$vitgpt2" train --output_dir run --max_steps 3 --synthetic_dir shapes --synthetic_train_images 16 \
  --synthetic_val_images 4 --disable_tqdm true
"$vitgpt2" eval caption --model run --images shapes/val --output predictions.json --max_new_tokens 8
"$py" -c 'import json; p = json.load(open("predictions.json")); assert len(p) == 4, p'
step "--quantize int8-compiled with the wheel's int8-compiled extra: compiled in a child process that imports the installed package, then loaded from the cache"
"$work/venv/bin/pip" install --quiet "${wheel}[int8-compiled]"
step "torchao resolved: $("$py" -c 'import torchao; print(torchao.__version__)')"
export VITGPT2_COMPILED_ENCODER_CACHE="$work/compiled"
for attempt in compile cached; do
  "$vitgpt2" eval caption --model run --images shapes/val --output "predictions_$attempt.json" --max_new_tokens 8 \
    --quantize int8-compiled
  "$py" -c "import json; p = json.load(open('predictions_$attempt.json')); assert len(p) == 4, p"
done
"$py" -c 'import os, pathlib; packages = list(pathlib.Path(os.environ["VITGPT2_COMPILED_ENCODER_CACHE"]).iterdir()); assert len(packages) == 1 and packages[0].suffix == ".pt2", packages'
"$vitgpt2" eval score --predictions predictions.json --annotations shapes/val.json --metrics cider bleu \
  --output scores.json
"$py" -c 'import json; s = json.load(open("scores.json")); assert "cider" in json.dumps(s), s'
"$vitgpt2" hub card run --repo_id someone/wheel-check > card.md
grep -q "pipeline_tag: image-text-to-text" card.md
step "the built-in study's first variant, read from the installed package data, on the model trained above"
# The built-in study with its first variant only, on fewer images and one epoch, so the check stays short.
"$py" - <<'PY'
import yaml

from modeling_vitgpt2.applications.study import BUILTIN_STUDY

study = yaml.safe_load(BUILTIN_STUDY.read_text())
study["variants"] = study["variants"][:1]
study["base"] = {"model": "run"}
study["data"].update(synthetic_train_images=16, synthetic_val_images=4)
study["recipe"].update(num_train_epochs=1, per_device_eval_batch_size=4, generation_max_length=8)
study["side_by_side"] = 2
study["extremes"] = {"top_k": 1}
open("first_variant.yaml", "w").write(yaml.safe_dump(study))
PY
"$vitgpt2" study first_variant.yaml --output_dir study --quiet
"$py" -c 'import json; r = json.load(open("study/results.json")); assert [row["status"] for row in r["rows"]] == ["ok", "ok"], r["rows"]'
test -s study/report.html
step "loading the trained folder through AutoModelForImageTextToText with remote code, outside the package"
"$py" - <<'PY'
import os
import sys

sys.modules["modeling_vitgpt2"] = None  # the folder's own copied code must load the model, not the package
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("run", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("run", trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
images = [Image.open(f"shapes/val/{name}").convert("RGB") for name in sorted(os.listdir("shapes/val"))[:2]]
out = model.generate(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"], num_beams=3,
                     max_new_tokens=6)
assert out.shape[0] == 2, out.shape
print("beam captions:", processor.batch_decode(out, skip_special_tokens=True))
PY
step "passed with the newest releases: vitgpt2 train, eval caption/score (also int8-compiled), hub card, the study's first variant and remote-code generate"
