#!/usr/bin/env bash
# The package as users install it: build the wheel, install it into a fresh virtual environment (torch from the
# same local package cache as the tests), and run the scripts from a folder outside the checkout, so that nothing
# can come from the source tree: `train.py --help`, the default training for a few steps, `eval.py caption` on the
# result, and the Hub model card (`python -m modeling_vitgpt2.hub card`). Fails on the first error.
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

step "installing $(basename "$wheel") with torch into a fresh virtual environment"
python -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet torch==2.14.1 torchvision==0.29.1 "$wheel"

step "running the scripts from outside the checkout"
mkdir "$work/user"
cp "$repo/train.py" "$repo/eval.py" "$work/user/"
cd "$work/user"
export HF_HUB_OFFLINE=1 PYTHONPATH= OMP_NUM_THREADS=1
py="$work/venv/bin/python"
"$py" -c 'import modeling_vitgpt2, sys; assert modeling_vitgpt2.__file__.startswith(sys.prefix), modeling_vitgpt2.__file__'
"$py" train.py --help > help.txt
grep -q -- "--max_new_tokens" help.txt
"$py" train.py --output_dir run --max_steps 3 --synthetic_dir shapes --synthetic_train_images 16 \
  --synthetic_val_images 4 --disable_tqdm true
"$py" eval.py caption --model run --images shapes/val --output predictions.json --max_new_tokens 8
"$py" -c 'import json; p = json.load(open("predictions.json")); assert len(p) == 4, p'
"$py" -m modeling_vitgpt2.hub card run --repo_id someone/wheel-check > card.md
grep -q "pipeline_tag: image-text-to-text" card.md
step "passed: the wheel installs and train.py, eval.py and the Hub card work from it"
