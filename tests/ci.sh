#!/usr/bin/env bash
# The whole test run, exactly what `.ci/run` and the README's test command do: install what the tests need (OS
# packages included), lint (ruff, configured in pyproject.toml), check the package as users install it (a wheel in
# a fresh virtual environment, used from outside the checkout: tests/wheel_install_check.sh), then run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
apt-get update -qq && apt-get install -y -qq chromium
pip install torch==2.14.1 torchvision==0.29.1 -e ".[test]"
ruff check .
bash tests/wheel_install_check.sh
python -m pytest -q
