"""The generation benchmark runs end to end on tiny models and writes the report it promises (timings unchecked)."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_vitgpt2.utils.cpu_features import has_fast_bfloat16

BENCH_GENERATE = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"
BENCH_DEMO_BATCHING = BENCH_GENERATE.with_name("bench_demo_batching.py")


@pytest.fixture(scope="module")
def tiny_saved_model(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny model saved with its processor, as training saves one: the benchmarks' --trained_model."""
    from conftest import tiny_config_kwargs
    from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration, ViTGPT2Processor

    folder = tmp_path_factory.mktemp("trained_model")
    torch.manual_seed(0)
    config = ViTGPT2Config(**tiny_config_kwargs(tiny_tokenizer, encoder_kwargs=dict(
        img_size=64, patch_size=16, embed_dim=48, depth=1, num_heads=2)))
    model = ViTGPT2ForConditionalGeneration(config)
    model.generation_config.max_new_tokens = 6
    model.save_pretrained(folder)
    ViTGPT2Processor.from_timm_model(model.encoder.model, tiny_tokenizer).save_pretrained(folder)
    return folder


def test_generate_benchmark_reports_identical_captions(tmp_path):
    output = tmp_path / "tmp.json"
    finished = subprocess.run(
        [sys.executable, str(BENCH_GENERATE), "--size", "tiny", "--batch_sizes", "1", "4", "--repeats", "1",
         "--profile", "--no_int8", "--latency_calls", "0", "--output", str(output)],
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


def test_demo_batching_benchmark_compares_both_pages_with_every_caption_checked(tmp_path):
    pytest.importorskip("gradio_client", reason="the demo benchmark needs the [test] extra (gradio_client)")
    output = tmp_path / "tmp.json"
    finished = subprocess.run(
        [sys.executable, str(BENCH_DEMO_BATCHING), "--size", "tiny", "--callers", "4", "--requests", "2", "--images",
         "3", "--max_batch_size", "4", "--max_new_tokens", "4", "--time_limit", "300", "--output", str(output)],
        capture_output=True, text=True, timeout=600,
    )
    assert finished.returncode == 0, finished.stderr

    report = json.loads(output.read_text())
    assert report["identical_captions"] is True and report["speedup"] > 0
    assert set(report["machine"]["cpu_flags"]) >= {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"}
    assert [page["max_batch_size"] for page in report["pages"].values()] == [1, 4]
    for page in report["pages"].values():
        assert page["images"] == 8 and page["identical_captions"] is True
        assert page["images_per_s"] > 0 and 0 < page["latency_p50_s"] <= page["latency_p95_s"]


def test_generate_benchmark_reports_int8_latency_bandwidth_and_memory(tmp_path, tiny_saved_model):
    """One run with everything the int8 paths add (eager, and with the encoder compiled), including CIDEr on a
    trained model (a tiny one saved here)."""
    output = tmp_path / "tmp.json"
    finished = subprocess.run(
        [sys.executable, str(BENCH_GENERATE), "--size", "tiny", "--batch_sizes", "2", "--repeats", "1",
         "--latency_calls", "2", "--new_tokens", "4", "--trained_model", str(tiny_saved_model),
         "--trained_model_images", "4", "--with_int8_compiled", "--output", str(output)],
        capture_output=True, text=True, timeout=600,  # seconds when idle; generous for a shared CI machine
    )
    assert finished.returncode == 0, finished.stderr

    report = json.loads(output.read_text())
    assert report["machine"]["cpu_capability"] and report["memory_read_gbs"] > 0
    assert report["int8_speedup"] > 0 and report["int8_compiled_speedup"] > 0
    assert 0 < report["latency_batch_1"]["int8_compiled"]["p50_s"]
    assert "cider_int8_compiled" in report["trained_model_int8_compiled"]
    row = report["rows"][0]
    assert 0 <= row["int8_identical_captions"] <= 1 and 0 < row["int8_token_agreement"] <= 1
    for model in ("ours", "peer", "int8"):
        assert row[model]["decode_fraction_of_bandwidth"] > 0
        assert report["memory_mb"][model]["weights"] > 0
    assert report["memory_mb"]["int8"]["weights"] < report["memory_mb"]["ours"]["weights"]
    for model in ("ours", "int8"):
        figures = report["latency_batch_1"][model]
        assert figures["calls"] == 2 and 0 < figures["p50_s"] <= figures["p95_s"]
    quality = report["trained_model_int8"]
    assert quality["images"] == 4 and 0 <= quality["identical_captions"] <= 1
    assert {"cider_fp32", "cider_int8", "cider_difference_percent"} <= quality.keys()


@pytest.mark.skipif(not has_fast_bfloat16(), reason="bfloat16 loads are refused on a CPU without avx512_bf16 or AMX")
def test_generate_benchmark_times_bf16_loaded_as_users_load_it(tmp_path, tiny_saved_model):
    """--with_bf16 adds our model in bfloat16 (through load_for_inference, as --dtype bfloat16) to the timed models,
    the latency and the memory figures, and its CIDEr against float32 on a trained model."""
    output = tmp_path / "tmp.json"
    finished = subprocess.run(
        [sys.executable, str(BENCH_GENERATE), "--size", "tiny", "--batch_sizes", "2", "--repeats", "1", "--no_int8",
         "--with_bf16", "--latency_calls", "2", "--new_tokens", "4", "--trained_model", str(tiny_saved_model),
         "--trained_model_images", "4", "--output", str(output)],
        capture_output=True, text=True, timeout=600,
    )
    assert finished.returncode == 0, finished.stderr

    report = json.loads(output.read_text())
    assert report["bf16_speedup"] > 0 and "int8" not in report["rows"][0]
    row = report["rows"][0]
    assert 0 <= row["bf16_identical_captions"] <= 1 and 0 < row["bf16_token_agreement"] <= 1
    assert row["bf16"]["decode_fraction_of_bandwidth"] > 0
    # Half of float32's bytes: the loader really gave bfloat16 weights.
    assert report["memory_mb"]["bf16"]["weights"] == pytest.approx(report["memory_mb"]["ours_blas"]["weights"] / 2,
                                                                   rel=0.01)
    assert 0 < report["latency_batch_1"]["bf16"]["p50_s"]
    quality = report["trained_model_bf16"]
    assert quality["images"] == 4 and 0 <= quality["identical_captions"] <= 1
    assert {"cider_fp32", "cider_bf16", "cider_difference_percent"} <= quality.keys()
    assert "cider_int8" in report["trained_model_int8"]




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
    # The published tables are this script's output.
    page = (BENCH_GENERATE.parents[1] / "docs" / "scaling.md").read_text()
    for dataset in ("### COCO", "### CC3M"):
        assert finished.stdout.split(dataset)[1].split("\n\n")[1].strip() in page


BENCH_INT8_MEMORY = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_int8_memory.py"


def test_int8_memory_benchmark_measures_each_load_in_its_own_process(tmp_path):
    output = tmp_path / "memory.json"
    finished = subprocess.run(
        [sys.executable, str(BENCH_INT8_MEMORY), "--size", "tiny", "--configurations", "fp32", "int8", "int8_lora",
         "--new_tokens", "4", "--output", str(output)],
        capture_output=True, text=True, timeout=600,
    )
    assert finished.returncode == 0, finished.stderr

    report = json.loads(output.read_text())
    assert report["machine"]["cpu_flags"] is not None and "--size tiny" in report["command"]
    runs = {run["configuration"]: run for run in report["runs"]}
    assert set(runs) == {"fp32", "int8", "int8_lora"}
    for run in runs.values():
        assert 0 < run["after_import"]["peak_mb"] <= run["after_load"]["peak_mb"] <= run["after_generate"]["peak_mb"]
        assert run["after_generate"]["seconds"] > 0 and len(run["tokens"][0]) == 5  # the start token + 4
    assert all(run["same_tokens_as_compared"] is None for run in runs.values())  # no --compare_with


BENCH_INT8_ENCODER = BENCH_GENERATE.with_name("bench_int8_encoder.py")


def test_int8_encoder_benchmark_times_each_runtime_and_reports_the_missing_ones(tmp_path):
    """Without onnxruntime/openvino installed (as in the test environment) their runtimes are reported as skipped, not
    failed; the ones that run are timed on the same weights and agree with float32."""
    output = tmp_path / "encoder.json"
    finished = subprocess.run(
        [sys.executable, str(BENCH_INT8_ENCODER), "--size", "tiny", "--batch_sizes", "1", "3", "--repeats", "1",
         "--runtimes", "fp32", "int8", "int8_compiled", "ort_int8", "--output", str(output)],
        capture_output=True, text=True, timeout=600,
    )
    assert finished.returncode == 0, finished.stderr
    report = json.loads(output.read_text())
    ran = {"fp32", "int8", "int8_compiled"} | ({"ort_int8"} if "ort_int8" not in report["skipped"] else set())
    assert set(report["runtimes"]) == ran and report["machine"]["cpu_flags"]
    for row in report["rows"]:
        assert row["int8_compiled"]["speedup_over_fp32"] > 0
        assert row["int8_compiled"]["cosine_to_fp32"] > 0.99 and row["int8"]["cosine_to_fp32"] > 0.99


def test_decode_floor_benchmark_checks_its_flat_step_against_the_model_and_reports_the_floor(tmp_path, monkeypatch):
    """Run in this process (the script's own start-up would cost more than the tiny run): its flat step computes
    the model's own step, and the floor adds up from the report's own parts."""
    monkeypatch.syspath_prepend(str(BENCH_GENERATE.parent))
    bench_decode_floor = importlib.import_module("bench_decode_floor")
    output = tmp_path / "floor.json"
    monkeypatch.setattr(sys, "argv", ["bench_decode_floor.py", "--size", "tiny", "--images", "1", "2", "--repeats",
                                      "1", "--new_tokens", "4", "--output", str(output)])
    bench_decode_floor.main()

    report = json.loads(output.read_text())
    assert report["flat_step_max_difference"] < 1e-4 and report["machine"]["cpu_flags"]
    assert [row["rows"] for row in report["results"]] == [3, 6]
    for row in report["results"]:
        ran = {"generate", "forward", "flat step"} | ({"ONNX Runtime"} if not row["skipped"] else set())
        # generate's step is its call less the image keys/values projection timed apart: at the tiny size both are
        # fractions of a millisecond, and noise can make the difference negative.
        assert set(row["step_ms"]) == ran and all(ms > 0 for way, ms in row["step_ms"].items() if way != "generate")
    floor = report["one_image_floor"]
    step_ms = report["results"][0]["step_ms"]
    assert floor["step_ms"] == min(step_ms.values()) == step_ms[floor["fastest_way"]]
    assert floor["caption_s"] == pytest.approx(
        floor["encoder_s"]["int8"] + floor["image_keys_values_s"] + 4 * floor["step_ms"] / 1e3)
