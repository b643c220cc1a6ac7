"""`eval.py` as users run it: every subcommand through a subprocess on tiny local models, checked against direct
computations; bad inputs fail with a message naming the file or field and leave no output behind."""

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASSES, PHOTOS, PREDICTIONS, REPO, direct_embeddings, random_image
from helpers import load_cli_module
from modeling_vitgpt2 import ImageLoadError, ViTGPT2ForConditionalGeneration, ViTGPT2Processor
from modeling_vitgpt2.evaluation.cider import corpus_cider
from modeling_vitgpt2.evaluation.jobs import (
    caption_folder,
    clip_score_extremes,
    run_zero_shot,
    score_predictions,
    write_attention_maps,
)
from modeling_vitgpt2.utils.io import InvalidJSONError

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TEMPLATES = ["This is a photo of {object}.", "No {object}, no score."]


def references(data_root: Path) -> dict[str, list[str]]:
    annotations = json.loads((data_root / "val.json").read_text())
    names = {entry["id"]: Path(entry["file_name"]).stem for entry in annotations["images"]}
    refs = {}
    for entry in annotations["annotations"]:
        refs.setdefault(names[entry["image_id"]], []).append(entry["caption"])
    return refs


def photo_paths(data_root: Path, names) -> list[Path]:
    return [data_root / "photos" / f"{name}{PHOTOS[name][2]}" for name in names]


def run_eval(args) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "eval.py", *map(str, args)], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cli(captioner_dir, tiny_clip, data, tmp_path_factory):
    """Runs every subcommand (and one failing command) at once: each process spends ~8 s importing torch and
    transformers, and running them side by side overlaps that. Returns the output folder and the runs by name."""
    out = tmp_path_factory.mktemp("cli")
    commands = {
        "caption": ["caption", "--model", captioner_dir, "--images", data / "photos", "--output", out / "preds.json",
                    "--batch_size", 2, "--max_new_tokens", 11],
        "score": ["score", "--predictions", data / "preds.json", "--annotations", data / "val.json",
                  "--images", data / "photos", "--clip_model", tiny_clip, "--output", out / "scores.json"],
        "zero-shot": ["zero-shot", "--clip_model", tiny_clip, "--images", data / "p1_val", "--labels",
                      data / "id2label.json", "--template", TEMPLATES[0], "--template", TEMPLATES[1], "--ensemble",
                      "--output", out / "zs.json"],
        "attention": ["attention", "--model", captioner_dir, "--images", *photo_paths(data, ["beach", "forest"]),
                      "--layer", "all", "--head", 1, "--max_length", 12, "--save_arrays",
                      "--output_dir", out / "attention"],
        "extremes": ["extremes", "--predictions", data / "preds.json", "--images", data / "photos",
                     "--clip_model", tiny_clip, "--model", captioner_dir, "--top_k", 1, "--layer", 0,
                     "--max_length", 12, "--output_dir", out / "extremes"],
        "missing folder": ["caption", "--model", captioner_dir, "--images", data / "nowhere",
                           "--output", out / "never.json"],
    }
    with ThreadPoolExecutor(len(commands)) as pool:
        runs = dict(zip(commands, pool.map(run_eval, commands.values())))
    return out, runs


def succeeded(run: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stderr[-3000:]}"
    return run


def test_caption_writes_one_caption_per_image_as_batch_of_one_would(cli, captioner_dir, data):
    out, runs = cli
    succeeded(runs["caption"])
    predictions = json.loads((out / "preds.json").read_text())
    assert list(predictions) == sorted(PHOTOS)
    assert all(isinstance(caption, str) and caption for caption in predictions.values())

    model = ViTGPT2ForConditionalGeneration.from_pretrained(captioner_dir).eval()
    processor = ViTGPT2Processor.from_pretrained(captioner_dir)
    with torch.no_grad():
        one_by_one = {name: processor.batch_decode(model.generate(
            **processor(images=photo_paths(data, [name])), num_beams=3, max_length=12))[0] for name in PHOTOS}
    # Batches of 2 keep each caption with its own image; 11 new tokens after the start token are max_length 12.
    assert predictions == one_by_one


def test_caption_downloads_a_hub_id_and_loads_it_as_its_folder(cli, captioner_dir, data, tmp_path, monkeypatch):
    from modeling_vitgpt2.inference import loading

    out, _ = cli
    asked = []
    monkeypatch.setattr(loading, "snapshot_download", lambda repo_id: asked.append(repo_id) or str(captioner_dir))
    argv = ["caption", "--model", "someone/vitgpt2-lora", "--images", data / "photos", "--output",
            tmp_path / "preds.json", "--batch_size", 2, "--max_new_tokens", 11]
    assert load_cli_module().main([str(arg) for arg in argv]) == 0
    assert asked == ["someone/vitgpt2-lora"]
    assert json.loads((tmp_path / "preds.json").read_text()) == json.loads((out / "preds.json").read_text())


def test_score_matches_corpus_cider_and_direct_clip_scores(cli, tiny_clip, data):
    out, runs = cli
    line = succeeded(runs["score"]).stdout.strip().splitlines()[-1]
    scores = json.loads((out / "scores.json").read_text())
    names = sorted(PHOTOS)
    refs = references(data)

    cider = corpus_cider(PREDICTIONS, refs)
    assert 0 < cider.score
    assert scores["cider"] == pytest.approx(cider.score, abs=1e-12)
    paths = photo_paths(data, names)
    images, captions = direct_embeddings(tiny_clip, paths, [PREDICTIONS[name] for name in names])
    cosine = (images * captions).sum(-1)
    clip_per_image = (2.5 * cosine.clamp_min(0)).tolist()
    # RefCLIP-S: harmonic mean of CLIP-S and the caption's best cosine with its own image's references
    best_reference = []
    for index, name in enumerate(names):
        _, reference_embeddings = direct_embeddings(tiny_clip, paths[:1], refs[name])
        best_reference.append(max(float((reference_embeddings @ captions[index]).max()), 0.0))
    ref_per_image = [0.0 if a + b == 0 else 2 * a * b / (a + b) for a, b in zip(clip_per_image, best_reference)]

    assert scores["clip_score"] == pytest.approx(sum(clip_per_image) / len(names), abs=1e-5)
    assert scores["ref_clip_score"] == pytest.approx(sum(ref_per_image) / len(names), abs=1e-5)
    assert list(scores["per_image"]) == names and scores["num_images"] == len(names)
    for index, name in enumerate(names):
        assert {key: scores["per_image"][name][key] for key in ("cider", "clip_score", "ref_clip_score")} == (
            pytest.approx({"cider": cider.per_image[name], "clip_score": clip_per_image[index],
                           "ref_clip_score": ref_per_image[index]}, abs=1e-5))
    assert line.startswith(f"CIDEr: {scores['cider']:.4f} | BLEU-1: ")
    assert f"| CLIPScore: {scores['clip_score']:.4f} | RefCLIPScore: {scores['ref_clip_score']:.4f} |" in line


def test_zero_shot_accuracy_and_csvs_match_a_direct_argmax(cli, tiny_clip, data):
    out, runs = cli
    table = succeeded(runs["zero-shot"]).stdout
    summary = json.loads((out / "zs.json").read_text())
    paths = sorted((data / "p1_val").iterdir())
    truth = [int(path.name.split("_")[0]) for path in paths]
    prompts = [template.replace("{object}", name) for template in TEMPLATES for name in CLASSES.values()]
    images, texts = direct_embeddings(tiny_clip, paths, prompts)
    per_template = dict(zip(TEMPLATES, texts.split(len(CLASSES))))
    mean = torch.stack(list(per_template.values())).mean(dim=0)
    per_template["ensemble"] = mean / mean.norm(dim=-1, keepdim=True)

    assert list(summary["accuracy"]) == TEMPLATES + ["ensemble"]
    assert summary["predictions_csv"] == {TEMPLATES[0]: "zs.0.csv", TEMPLATES[1]: "zs.1.csv",
                                          "ensemble": "zs.ensemble.csv"}
    for template, text in per_template.items():
        predicted = (images @ text.T).argmax(dim=-1).tolist()
        accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
        assert summary["accuracy"][template] == pytest.approx(accuracy)
        rows = [f"{path.name},{label}" for path, label in zip(paths, predicted)]
        assert (out / summary["predictions_csv"][template]).read_text().splitlines() == ["filename,label", *rows]
        assert f"{accuracy:.4f}  {template}" in table


def test_attention_writes_a_png_and_arrays_per_image(cli):
    out, runs = cli
    printed = succeeded(runs["attention"]).stdout
    folder = out / "attention"
    assert sorted(path.name for path in folder.iterdir()) == [
        "beach_attention.npz", "beach_attention.png", "forest_attention.npz", "forest_attention.png"]
    for stem in ("beach", "forest"):
        with Image.open(folder / f"{stem}_attention.png") as png:
            assert png.format == "PNG"
        arrays = np.load(folder / f"{stem}_attention.npz")
        words = list(arrays["words"])
        assert words and words == str(arrays["caption"]).split()
        assert arrays["maps"].shape == (len(words), 2, 2)  # a 28 px image in 14 px patches
        assert np.allclose(arrays["maps"].sum(axis=(1, 2)) + arrays["prefix_weights"], 1, atol=1e-5)
        assert list(arrays["layers"]) == [0, 1] and int(arrays["head"]) == 1
        assert f"{stem}_attention.png: {arrays['caption']}" in printed


def test_extremes_picks_the_highest_and_lowest_clip_score(cli, tiny_clip, data):
    out, runs = cli
    succeeded(runs["extremes"])
    summary = json.loads((out / "extremes" / "extremes.json").read_text())
    names = sorted(PHOTOS)
    images, captions = direct_embeddings(tiny_clip, photo_paths(data, names), [PREDICTIONS[n] for n in names])
    scores = dict(zip(names, (2.5 * (images * captions).sum(-1).clamp_min(0)).tolist()))
    best = min(names, key=lambda name: (-scores[name], name))
    worst = min(names, key=lambda name: (scores[name], name))
    assert scores[best] > scores[worst]  # premise: the scores are not all equal

    assert [entry["name"] for entry in summary["best"]] == [best]
    assert [entry["name"] for entry in summary["worst"]] == [worst]
    for entry in summary["best"] + summary["worst"]:
        assert entry["clip_score"] == pytest.approx(scores[entry["name"]], abs=1e-5)
        assert entry["caption"] == PREDICTIONS[entry["name"]]
        assert Path(entry["png"]).is_file()
    assert sorted(path.name for path in (out / "extremes").iterdir()) == sorted(
        ["extremes.json", f"best_1_{best}_attention.png", f"worst_1_{worst}_attention.png"])


def test_a_cli_error_names_the_problem_without_a_traceback(cli, data):
    out, runs = cli
    run = runs["missing folder"]
    assert run.returncode == 2
    assert f"image folder not found: {data / 'nowhere'}" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (out / "never.json").exists()


def test_cli_errors_in_process(data, tiny_clip, tmp_path, capsys):
    """The CLI's own branches, without paying for a process each: exit status 2, the message, no output file."""
    main = load_cli_module().main
    broken = tmp_path / "broken.json"
    broken.write_text('{"beach": "a boat",\n "forest": }')
    cases = [
        (["zero-shot", "--clip_model", tiny_clip, "--images", data / "p1_val", "--labels", data / "id2label.json",
          "--output", tmp_path / "out" / "zs.json"], "no prompt templates given"),
        (["score", "--predictions", broken, "--annotations", data / "val.json", "--output",
          tmp_path / "out" / "scores.json"], r"broken.json is not valid JSON: .* at line 2, column 12"),
    ]
    for argv, message in cases:
        assert main([str(arg) for arg in argv]) == 2
        assert re.search(message, capsys.readouterr().err)
        assert not (tmp_path / "out").exists()

    assert main(["score", "--predictions", str(data / "preds.json"), "--annotations", str(data / "val.json"),
                 "--metrics", "cider", "clip_score", "--output", str(tmp_path / "cider.json")]) == 0
    output = capsys.readouterr()
    assert output.out.strip() == f"CIDEr: {corpus_cider(PREDICTIONS, references(data)).score:.4f}"
    assert "clip_score skipped: CLIPScore needs a CLIP model" in output.err
    scores = json.loads((tmp_path / "cider.json").read_text())
    assert scores["clip_score"] is None and scores["clip_model"] is None
    assert scores["cider"] == pytest.approx(corpus_cider(PREDICTIONS, references(data)).score)


def test_hessel_prefix_gets_one_space_before_the_caption(data, tiny_clip):
    names = sorted(PHOTOS)
    images, captions = direct_embeddings(tiny_clip, photo_paths(data, names),
                                         [f"A photo depicts {PREDICTIONS[name]}" for name in names])
    expected = (2.5 * (images * captions).sum(-1).clamp_min(0)).mean().item()
    for prefix in ("A photo depicts", "A photo depicts "):
        report = score_predictions(data / "preds.json", data / "val.json", data / "photos", clip_model=tiny_clip,
                                   clip_prefix=prefix, progress=False)
        assert report.clip_prefix == "A photo depicts "
        assert report.clip_score == pytest.approx(expected, abs=1e-5)


def bad_inputs(data, captioner_dir, tiny_clip, tmp_path, out):
    """(what to run, error type, message pattern) for each bad input; every output goes under `out`."""
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    random_image(0, (32, 32)).save(unreadable / "fine.png")
    (unreadable / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    clashing = tmp_path / "clashing"
    clashing.mkdir()
    for extension in (".png", ".jpg"):
        random_image(0, (32, 32)).save(clashing / f"same{extension}")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({**{name: PREDICTIONS[name] for name in ("beach", "forest")}, "ghost": "boo"}))
    not_a_caption = tmp_path / "not_a_caption.json"
    not_a_caption.write_text(json.dumps({**PREDICTIONS, "logo": ["a", "list"]}))
    no_caption_field = tmp_path / "no_caption.json"
    no_caption_field.write_text(json.dumps({"images": [{"file_name": "beach.png", "id": 1}],
                                            "annotations": [{"image_id": 1, "id": 1}]}))
    stray_class = tmp_path / "stray"
    stray_class.mkdir()
    random_image(0, (32, 32)).save(stray_class / "7_0.png")
    photos, id2label = data / "photos", data / "id2label.json"

    def zero_shot(templates, images=data / "p1_val"):
        return lambda: run_zero_shot(images, id2label, templates, out / "zs.json", clip_model=tiny_clip,
                                     progress=False)

    return [
        (lambda: caption_folder(captioner_dir, tmp_path / "nowhere", output=out / "p.json", progress=False),
         FileNotFoundError, "image folder not found: .*nowhere"),
        (lambda: caption_folder(captioner_dir, unreadable, output=out / "p.json", progress=False),
         ImageLoadError, "cannot read image .*truncated.png"),
        (lambda: caption_folder(captioner_dir, clashing, output=out / "p.json", progress=False),
         ValueError, "same.jpg and .*same.png would share the prediction key 'same'"),
        (lambda: score_predictions(partial, data / "val.json", output=out / "s.json", progress=False),
         ValueError, r"3 missing \('logo', 'night', 'street'\), 1 extra \('ghost'\)"),
        (lambda: score_predictions(not_a_caption, data / "val.json", output=out / "s.json", progress=False),
         InvalidJSONError, "not_a_caption.json: field 'logo' must be a caption string"),
        (lambda: score_predictions({"beach": "x"}, no_caption_field, output=out / "s.json", progress=False),
         InvalidJSONError, r"no_caption.json: annotations\[0\] has no field 'caption'"),
        (lambda: score_predictions(data / "preds.json", data / "val.json", clip_model=tiny_clip,
                                   output=out / "s.json", progress=False), ValueError, "CLIPScore needs the images"),
        (lambda: score_predictions(data / "preds.json", data / "val.json", unreadable, clip_model=tiny_clip,
                                   output=out / "s.json", progress=False),
         FileNotFoundError, r"5 image\(s\) listed in .*val.json are not in .*unreadable"),
        (zero_shot([]), ValueError, "no prompt templates given"),
        (zero_shot(["a photo of a thing"]), ValueError, r"'a photo of a thing' has no \{object\}"),
        (zero_shot(TEMPLATES, stray_class), ValueError, "'7_0.png' names class id 7"),
        (lambda: write_attention_maps(captioner_dir, [unreadable / "truncated.png"], out, progress=False),
         ImageLoadError, "truncated.png"),
        (lambda: write_attention_maps(captioner_dir, [photos / "beach.png"], out, layer=5, progress=False),
         ValueError, r"layer\(s\) \[5\] have no cross-attention"),
        (lambda: clip_score_extremes(partial, photos, tiny_clip, progress=False),
         FileNotFoundError, r"have no image in .*photos: 'ghost'\."),
        (lambda: clip_score_extremes(data / "preds.json", photos, tiny_clip, top_k=6, progress=False),
         ValueError, "top_k must be between 1 and the number of predictions"),
    ]


def test_bad_inputs_fail_naming_the_problem_and_write_nothing(data, captioner_dir, tiny_clip, tmp_path):
    out = tmp_path / "out"
    for job, error, message in bad_inputs(data, captioner_dir, tiny_clip, tmp_path, out):
        with pytest.raises(error, match=message):
            job()
        assert not out.exists() or not any(out.iterdir()), f"{message}: something was written before the error"


def test_attention_on_real_photos(captioner_dir, real_photos, tmp_path):
    written = write_attention_maps(captioner_dir, real_photos, tmp_path, layer=[0, 1], max_length=12,
                                   progress=False)
    assert [Path(entry["png"]).name for entry in written] == [f"{path.stem}_attention.png" for path in real_photos]
    assert all(Path(entry["png"]).stat().st_size > 0 and entry["caption"] for entry in written)
