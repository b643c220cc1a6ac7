"""The training benchmark runs end to end on tiny models, and both stacks' loss curves agree (timings unchecked)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_TRAIN = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
STACKS = ("peer", "ours", "ours_cached")


def test_train_benchmark_reports_matching_loss_curves(tmp_path):
    output = tmp_path / "tmp.json"
    finished = subprocess.run(
        # One thread: tiny ops on two threads crawl when other jobs load the machine.
        [sys.executable, str(BENCH_TRAIN), "--size", "tiny", "--threads", "1", "--memory_profile",
         "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert finished.returncode == 0, finished.stderr

    report = json.loads(output.read_text())
    assert {
        "command", "machine", "load_average", "matmul_gflops", "speedup", "speedup_10_epochs_with_cache",
        "ten_epochs_s", "loss_max_abs_diff", "loss_max_abs_diff_cached", "stacks",
    } <= report.keys()
    assert "--size tiny" in report["command"]
    assert {"cpu", "cores", "torch", "torch_threads"} <= report["machine"].keys()
    assert report["loss_max_abs_diff"] < 1e-4
    assert report["loss_max_abs_diff_cached"] < 1e-2  # float16 features

    steps = report["epochs"] * report["num_images"] // report["batch_size"]
    for name in STACKS:
        stack = report["stacks"][name]
        assert {"epoch_s", "samples_per_s", "peak_memory_mib", "fraction_of_matmul", "trainable_params"} <= stack.keys()
        assert len(stack["epoch_s"]) == report["epochs"] and len(stack["losses"]) == steps
        assert stack["peak_memory_mib"] > 0
    assert report["stacks"]["ours_cached"]["prepass_s"] > 0
    # The same modules train in both stacks (tiny has no enc_to_dec_proj).
    assert report["stacks"]["peer"]["trainable_params"] == report["stacks"]["ours"]["trainable_params"]

    # The memory breakdown: the frozen encoder's weights are part of a step from pixels only.
    memory = report["memory_profile"]
    for name in STACKS:
        assert memory[name]["peak_mib"] == pytest.approx(sum(memory[name]["at_peak_mib"].values()))
        assert memory[name]["at_peak_mib"]["optimizer_state"] > 0 and memory[name]["at_peak_mib"]["activation"] > 0
    assert memory["ours_cached"]["at_peak_mib"]["parameter"] < memory["ours"]["at_peak_mib"]["parameter"]
