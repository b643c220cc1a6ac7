#!/usr/bin/env bash
# The whole test run, exactly what `.ci/run` and the README's test command do: install what the tests need (OS
# packages included) at the releases pinned in tests/constraints.txt, so that a clone tested next month tests what
# was tested today; lint (ruff, configured in pyproject.toml); check the package as users install it, with the
# newest releases its ranges allow (a wheel in a fresh virtual environment, used from outside the checkout:
# tests/wheel_install_check.sh, run beside the suite); and run the suite against the pinned environment.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
# g++: Inductor compiles C++ for --quantize int8-compiled (tests/test_compiled_encoder.py).
apt-get update -qq && apt-get install -y -qq chromium g++
pip install -c tests/constraints.txt torch==2.14.1 torchvision==0.29.1 -e ".[test]"
ruff check .
# The wheel check spends half its time installing a fresh virtual environment (disk and registry, not the CPU), so
# it runs beside the suite; its log is printed once both are done, and either failing fails CI.
wheel_log="$(mktemp)"
bash tests/wheel_install_check.sh > "$wheel_log" 2>&1 &
wheel_check=$!
suite_status=0
python -m pytest -q || suite_status=$?
wheel_status=0
wait "$wheel_check" || wheel_status=$?
cat "$wheel_log"
rm -f "$wheel_log"
echo "CI took $((SECONDS - started)) s (suite exit status $suite_status, wheel check exit status $wheel_status)"
[ "$suite_status" -eq 0 ] && [ "$wheel_status" -eq 0 ]
