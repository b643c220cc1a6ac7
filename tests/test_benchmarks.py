"""The generation benchmark runs end to end on tiny models and writes the report it promises (timings unchecked)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH_GENERATE = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"


def test_generate_benchmark_reports_identical_captions(tmp_path):
    output = tmp_path / "tmp.json"
    finished = subprocess.run(
        [sys.executable, str(BENCH_GENERATE), "--size", "tiny", "--batch_sizes", "1", "4", "--repeats", "1",
         "--profile", "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert finished.returncode == 0, finished.stderr

    report = json.loads(output.read_text())
    assert {"command", "machine", "speedup", "identical", "rows", "matmul_gflops", "profile"} <= report.keys()
    assert report["identical"] is True
    assert {"cpu", "cores", "torch", "torch_threads"} <= report["machine"].keys()
    assert "--size tiny" in report["command"]
    assert [row["batch_size"] for row in report["rows"]] == [1, 4]
    for row in report["rows"]:
        assert row["identical"] is True and row["token_agreement"] == 1.0
        for model in ("ours", "peer"):
            assert {"captions_per_s", "encoder_s", "decode_s", "fraction_of_matmul"} <= row[model].keys()
    assert report["profile"]["ours"] and report["profile"]["peer"]


def test_scaling_on_paper_reproduces_the_training_benchmarks_flops_and_the_cache_arithmetic(tmp_path):
    output = tmp_path / "scaling.json"
    finished = subprocess.run(
        [sys.executable, str(BENCH_GENERATE.parent / "scaling_on_paper.py"), "--output", str(output)],
        capture_output=True, text=True, timeout=120,
    )
    assert finished.returncode == 0, finished.stderr  # it exits when its LoRA count differs from the benchmark's
    report = json.loads(output.read_text())
    assert report["feature_bytes_per_image"] == 257 * 1024 * 2
    coco = report["datasets"]["COCO 2017 train"]
    assert coco["cache_bytes"] == 118_287 * 257 * 1024 * 2
    lora = coco["methods"]["lora"]
    # The cache runs the encoder once per image instead of once per caption: about 5x less encoder work on COCO.
    per_sample = report["per_sample_flops"]["lora"]
    assert lora["epoch"] == 591_753 * (per_sample["encoder"] + per_sample["decoder"])
    assert lora["cache_prepass"] == 118_287 * per_sample["encoder"]
    assert lora["epoch_hours_8gpu"] == lora["epoch_hours_1gpu"] / 8
    assert coco["methods"]["full + encoder"]["cached_epoch"] is None  # a trained encoder cannot be cached
    # The published table is this script's output.
    readme = (BENCH_GENERATE.parents[1] / "README.md").read_text()
    assert finished.stdout.split("### COCO")[1].split("\n\n")[1].strip() in readme
