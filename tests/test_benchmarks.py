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
