"""The atomic writer (`utils.io.atomic_path`) on links, permissions and long names, and `eval.py` refusing an output
that is one of its own inputs: bad input never loses or half-writes a file."""

import json
import os
import re
import stat
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO
from helpers import load_cli_module
from modeling_vitgpt2.utils.io import atomic_path, leftover_temporaries, write_json_atomic


def hidden_files(*folders):
    return sorted(path.name for folder in folders for path in folder.iterdir() if path.name.startswith("."))


# ----------------------------------------------------------------------------------------------------------------
# Symbolic links: the write goes to the target and the link stays


def test_writing_through_a_symbolic_link_updates_its_target(tmp_path):
    (tmp_path / "runs" / "7").mkdir(parents=True)
    target = tmp_path / "runs" / "7" / "scores.json"
    target.write_text('{"old": 1}')
    link = tmp_path / "latest.json"
    link.symlink_to(os.path.join("runs", "7", "scores.json"))  # relative, as `ln -s` users make them

    write_json_atomic(link, {"new": 2})

    assert link.is_symlink() and os.readlink(link) == os.path.join("runs", "7", "scores.json")
    assert json.loads(target.read_text()) == {"new": 2}
    assert hidden_files(tmp_path, target.parent) == []


def test_a_dangling_link_gets_its_target_written(tmp_path):
    link = tmp_path / "latest.json"
    link.symlink_to(tmp_path / "runs" / "8" / "scores.json")  # made before the run that fills it

    write_json_atomic(link, {"cider": 1.0})

    assert link.is_symlink()
    assert json.loads((tmp_path / "runs" / "8" / "scores.json").read_text()) == {"cider": 1.0}


def test_a_loop_of_links_is_refused_naming_it(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.symlink_to(second)
    second.symlink_to(first)
    with pytest.raises(OSError, match=r"a\.json: it is a loop of symbolic links"):
        write_json_atomic(first, {"cider": 1.0})
    assert first.is_symlink() and second.is_symlink() and hidden_files(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------------
# Permissions and long names


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o444])
def test_a_rewrite_keeps_the_files_permissions(tmp_path, mode):
    path = tmp_path / "private.json"
    path.write_text("{}")
    path.chmod(mode)
    previous = os.umask(0o022)
    try:
        write_json_atomic(path, {"secret": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert json.loads(path.read_text()) == {"secret": 1}


# 249 and 254 bytes with the suffix: legal names (the limit is 255 bytes), too long for a temporary name beside them
@pytest.mark.parametrize("stem", ["x" * 245, "é" * 120 + "_attention"], ids=["ascii", "utf-8"])
def test_a_long_legal_file_name_is_written_atomically(tmp_path, stem):
    path = tmp_path / f"{stem}.png"
    assert len(os.fsencode(path.name)) <= 255
    with atomic_path(path) as temporary:
        temporary.write_bytes(b"png")
        assert temporary.name.endswith(".png")  # what savefig and np.savez need
        assert leftover_temporaries(path) == [temporary]  # what a killed write would leave
    assert path.read_bytes() == b"png" and hidden_files(tmp_path) == []


def test_leftover_temporaries_are_only_those_of_the_file_asked_about(tmp_path):
    shared = "y" * 200
    with atomic_path(tmp_path / f"{shared}A.json") as first, atomic_path(tmp_path / f"{shared}B.json") as second:
        first.write_text("{}")
        second.write_text("{}")
        assert leftover_temporaries(tmp_path / f"{shared}A.json") == [first]
        assert leftover_temporaries(tmp_path / f"{shared}B.json") == [second]
    with atomic_path(tmp_path / "a.b.json") as temporary:  # stem "a.b", not a temporary of a.json
        temporary.write_text("{}")
        assert leftover_temporaries(tmp_path / "a.json") == []
        assert leftover_temporaries(tmp_path / "a.b.json") == [temporary]


# ----------------------------------------------------------------------------------------------------------------
# eval.py: an output that is one of the command's inputs is refused before any work


def run_eval(argv, capsys):
    """eval.py's exit status and the last line of its stderr, run in this process."""
    status = load_cli_module().main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err.strip().splitlines()[-1] if err.strip() else ""


def unchanged(*paths):
    """The contents of `paths`, to compare after a refused command."""
    return {path: path.read_bytes() for path in paths}


@pytest.fixture()
def scoring(data, tmp_path):
    for name in ("val.json", "preds.json"):
        (tmp_path / name).write_bytes((data / name).read_bytes())
    return tmp_path


@pytest.mark.parametrize("how", ["annotations", "predictions", "relative path", "symbolic link", "hard link"])
def test_eval_score_refuses_an_output_that_is_an_input(scoring, capsys, monkeypatch, how):
    annotations, predictions = scoring / "val.json", scoring / "preds.json"
    output = {"annotations": annotations, "predictions": predictions}.get(how)
    if how == "relative path":
        monkeypatch.chdir(scoring / "..")
        output = os.path.join(scoring.name, ".", "val.json")
    elif how == "symbolic link":
        output = scoring / "latest.json"
        output.symlink_to(annotations)
    elif how == "hard link":
        output = scoring / "copy.json"
        os.link(predictions, output)
    before = unchanged(annotations, predictions)

    status, err = run_eval(["score", "--predictions", predictions, "--annotations", annotations,
                            "--metrics", "cider", "--output", output], capsys)

    assert status == 2
    expected = "--predictions" if how in ("predictions", "hard link") else "--annotations"
    assert re.search(rf"eval.py score: error: writing \S*{os.path.basename(output)} \(--output\) would overwrite the "
                     rf"input \S+ \({expected}\); choose another --output$", err), err
    assert unchanged(annotations, predictions) == before


def test_eval_score_refusal_as_users_run_it(scoring):
    # /tmp/adv_study/t9: `eval.py score --annotations val.json --output val.json` exited 0 and lost the references
    before = unchanged(scoring / "val.json")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(REPO / "eval.py"), "score", "--predictions", "preds.json",
                          "--annotations", "val.json", "--metrics", "cider", "--output", "val.json"],
                         cwd=scoring, env=environment, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == ("eval.py score: error: writing val.json (--output) would overwrite "
                                                   "the input val.json (--annotations); choose another --output")
    assert unchanged(scoring / "val.json") == before


@pytest.mark.parametrize("clash", ["labels", "labels_file", "image"])
def test_eval_zero_shot_refuses_outputs_that_are_inputs(data, tmp_path, capsys, monkeypatch, clash):
    from modeling_vitgpt2.evaluation import jobs as evaluation

    monkeypatch.setattr(evaluation, "zero_shot_folder", lambda *a, **k: pytest.fail("classified before checking"))
    images = tmp_path / "images"
    images.mkdir()
    for name in os.listdir(data / "p1_val"):
        (images / name).write_bytes((data / "p1_val" / name).read_bytes())
    labels = tmp_path / "id2label.json"
    labels.write_bytes((data / "id2label.json").read_bytes())
    truth = tmp_path / "zs.1.csv"  # the CSV of the second template, beside --output zs.json
    truth.write_text("filename,label\n" + "".join(f"{name},{name[0]}\n" for name in sorted(os.listdir(images))))
    output = {"labels": labels, "labels_file": tmp_path / "zs.json", "image": images / "0_0.png"}[clash]
    before = unchanged(labels, truth, *images.iterdir())

    status, err = run_eval(["zero-shot", "--clip_model", "unused", "--images", images, "--labels", labels,
                            "--labels_file", truth, "--template", "a {object}", "--template", "the {object}",
                            "--output", output], capsys)

    assert status == 2
    overwritten = {"labels": "id2label.json (--labels)", "labels_file": "zs.1.csv (--labels_file)",
                   "image": "0_0.png (--images)"}[clash]
    assert re.search(rf"would overwrite the input \S*{re.escape(overwritten)}; choose another --output$", err), err
    assert unchanged(labels, truth, *images.iterdir()) == before


@pytest.mark.parametrize("clash", ["image", "model file"])
def test_eval_caption_refuses_an_output_that_is_an_input(data, tmp_path, capsys, monkeypatch, clash):
    from modeling_vitgpt2.evaluation import jobs as evaluation

    monkeypatch.setattr(evaluation, "load_captioner", lambda *a, **k: pytest.fail("loaded the model before checking"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "vitgpt2"}')
    output = {"image": data / "photos" / "beach.png", "model file": model / "config.json"}[clash]
    before = unchanged(output)

    status, err = run_eval(["caption", "--model", model, "--images", data / "photos", "--output", output], capsys)

    assert status == 2
    option = {"image": "--images", "model file": "--model"}[clash]
    assert err.endswith(f"would overwrite the input {output} ({option}); choose another --output"), err
    assert unchanged(output) == before


def test_eval_attention_refuses_a_map_over_an_input_image(data, tmp_path, capsys, monkeypatch):
    from modeling_vitgpt2.evaluation import jobs as evaluation

    monkeypatch.setattr(evaluation, "load_captioner", lambda *a, **k: pytest.fail("loaded the model before checking"))
    image, earlier_map = tmp_path / "x.png", tmp_path / "x_attention.png"
    for path in (image, earlier_map):
        Image.new("RGB", (16, 16), (200, 0, 0)).save(path)
    before = unchanged(image, earlier_map)

    status, err = run_eval(["attention", "--model", tmp_path, "--images", image, earlier_map,
                            "--output_dir", tmp_path], capsys)

    assert status == 2
    assert err.endswith(f"writing {earlier_map} (--output_dir) would overwrite the input {earlier_map} (--images); "
                        "choose another --output_dir"), err
    assert unchanged(image, earlier_map) == before


def test_eval_extremes_refuses_a_summary_over_its_predictions(data, tmp_path, capsys, monkeypatch):
    from modeling_vitgpt2.evaluation import jobs as evaluation

    monkeypatch.setattr(evaluation, "clip_score_extremes", lambda *a, **k: pytest.fail("scored before checking"))
    predictions = tmp_path / "extremes.json"
    predictions.write_bytes((data / "preds.json").read_bytes())
    before = unchanged(predictions)

    status, err = run_eval(["extremes", "--predictions", predictions, "--images", data / "photos",
                            "--clip_model", "unused", "--model", "unused", "--output_dir", tmp_path], capsys)

    assert status == 2
    assert err.endswith(f"would overwrite the input {predictions} (--predictions); choose another --output_dir"), err
    assert unchanged(predictions) == before
