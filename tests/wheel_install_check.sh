#!/usr/bin/env bash
# The package as users install it, with the newest releases its ranges allow: build the wheel, install it into a
# fresh virtual environment WITHOUT tests/constraints.txt (torch from the same local package cache as the tests),
# print the releases that resolved, and run the package's own fast checks from a folder outside the checkout, so
# that nothing can come from the source tree: a few training steps, `eval.py caption` and `score`, the Hub model
# card, a load through AutoModelForImageTextToText with remote code and a short beam-search `generate`. The
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
# The releases that differ from tests/constraints.txt are the suspects when a check below fails.
newer="$("$py" - "$repo/tests/constraints.txt" <<'PY'
import importlib.metadata, re, sys
pinned = dict(line.strip().split("==") for line in open(sys.argv[1]) if "==" in line and not line.startswith("#"))
canonical = lambda name: re.sub(r"[-_.]+", "-", name).lower()
installed = {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
print(" ".join(f"{name}=={installed[name]} (pinned {version})" for name, version in sorted(pinned.items())
               if name in installed and installed[name] != version))
PY
)"
step "newest releases: $("$work/venv/bin/pip" freeze | grep -iE '^(torch|torchvision|transformers|peft|accelerate|timm|datasets|evaluate|huggingface.hub|safetensors|tokenizers|torchdata)==' | tr '\n' ' ')"
step "differing from tests/constraints.txt: ${newer:-none}"
trap 'echo "wheel check FAILED with the newest releases; releases differing from tests/constraints.txt: ${newer:-none}" >&2; rm -rf "$work"' EXIT
fail() { trap - EXIT; echo "wheel check FAILED at: $*; releases differing from tests/constraints.txt: ${newer:-none}" >&2; rm -rf "$work"; exit 1; }

step "running the scripts from outside the checkout"
mkdir "$work/user"
cp "$repo/train.py" "$repo/eval.py" "$work/user/"
cd "$work/user"
export HF_HUB_OFFLINE=1 PYTHONPATH= OMP_NUM_THREADS=1
"$py" -c 'import modeling_vitgpt2, sys; assert modeling_vitgpt2.__file__.startswith(sys.prefix), modeling_vitgpt2.__file__' \
  || fail "importing the installed package"
"$py" train.py --help > help.txt || fail "train.py --help"
grep -q -- "--max_new_tokens" help.txt || fail "train.py --help lists --max_new_tokens"
"$py" train.py --output_dir run --max_steps 3 --synthetic_dir shapes --synthetic_train_images 16 \
  --synthetic_val_images 4 --disable_tqdm true || fail "train.py, 3 steps on the synthetic set"
"$py" eval.py caption --model run --images shapes/val --output predictions.json --max_new_tokens 8 \
  || fail "eval.py caption"
"$py" -c 'import json; p = json.load(open("predictions.json")); assert len(p) == 4, p' || fail "4 captions written"
"$py" eval.py score --predictions predictions.json --annotations shapes/val.json --metrics cider bleu \
  --output scores.json || fail "eval.py score"
"$py" -c 'import json; s = json.load(open("scores.json")); assert "cider" in json.dumps(s), s' || fail "CIDEr in scores.json"
"$py" -m modeling_vitgpt2.hub card run --repo_id someone/wheel-check > card.md || fail "the Hub card"
grep -q "pipeline_tag: image-text-to-text" card.md || fail "the card's pipeline tag"
step "loading the trained folder through AutoModelForImageTextToText with remote code, outside the package"
"$py" - <<'PY' || fail "AutoModelForImageTextToText with trust_remote_code and a beam-search generate"
import subprocess, sys
# The folder's own copied code must load the model: run with the package hidden from imports.
script = r'''
import sys
sys.modules["modeling_vitgpt2"] = None
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained("run", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("run", trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
images = [Image.open(f"shapes/val/{name}").convert("RGB") for name in sorted(__import__("os").listdir("shapes/val"))[:2]]
inputs = processor(images=images, return_tensors="pt")
out = model.generate(pixel_values=inputs["pixel_values"], num_beams=3, max_new_tokens=6)
print("beam captions:", processor.batch_decode(out, skip_special_tokens=True))
assert out.shape[0] == 2
'''
subprocess.run([sys.executable, "-c", script], check=True)
PY
trap 'rm -rf "$work"' EXIT
step "passed with the newest releases: train.py, eval.py caption/score, the Hub card and remote-code generate"
