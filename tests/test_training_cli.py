"""`train.py` as users run it: resuming a killed run, two processes, and the built-in default pipeline."""

import contextlib
import copy
import json
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from helpers import environment, step_losses, train_command
from modeling_vitgpt2.data.synthetic import write_synthetic_coco


def test_resuming_a_killed_run_loses_and_repeats_no_step(shapes, pretrained_parts, tmp_path):
    common = ["--max_steps", "9", "--save_strategy", "steps", "--save_steps", "3"]
    reference_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    subprocess.run([sys.executable, *train_command(shapes, pretrained_parts, reference_dir, *common)],
                   cwd=REPO, env=environment(), check=True, capture_output=True)

    # Slow each step down so the kill lands mid-run, after the first checkpoint is complete.
    process = subprocess.Popen(
        [sys.executable, *train_command(shapes, pretrained_parts, killed_dir, *common)],
        cwd=REPO, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed_dir / "checkpoint-3" / "checkpoint_complete.json").exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "checkpoint-9").exists(), "the run finished before it could be killed"

    subprocess.run(
        [sys.executable, *train_command(shapes, pretrained_parts, killed_dir, *common, "--resume_from_checkpoint", "true")],
        cwd=REPO, env=environment(), check=True, capture_output=True,
    )
    expected = step_losses(reference_dir, "checkpoint-9")
    resumed = step_losses(killed_dir, "checkpoint-9")
    assert sorted(resumed) == list(range(1, 10))
    assert resumed == pytest.approx(expected, abs=1e-4)


def test_an_incomplete_checkpoint_is_not_resumed_from(tmp_path):
    from modeling_vitgpt2.training.checkpoints import last_complete_checkpoint

    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "checkpoint_complete.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")


def test_two_processes_train_and_score_every_image_once(pretrained_parts, tmp_path):
    # Five validation images over two processes: an uneven split that the stock gather would pad with a duplicate.
    odd = write_synthetic_coco(tmp_path / "data", num_train=8, num_val=5, seed=2, image_size=32)
    output_dir = tmp_path / "ddp"
    # Without --use_cpu, as users launch it: on a machine without a GPU the launcher's two processes must still train
    # data-parallel (gloo), not as two independent runs into one folder.
    arguments = [argument for argument in train_command(odd, pretrained_parts, output_dir, "--max_steps", "3",
                                                        "--save_strategy", "no") if argument != "--use_cpu"]
    with socket.socket() as probe:  # a free port: a fixed one collides with another test run on the same machine
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               *arguments]
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((output_dir / "training_summary.json").read_text())
    assert summary["world_size"] == 2
    metrics = json.loads((output_dir / "eval_results.json").read_text())
    predictions = json.loads((output_dir / "eval_predictions.json").read_text())
    assert metrics["eval_images"] == 5 and len(predictions) == 5
    assert set(predictions) == {path.stem for path in odd.val_images.iterdir()}


def default_model_size(vocab_size: int) -> int:
    from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration
    from modeling_vitgpt2.training.run import DEFAULT_SCRATCH_MODEL

    model = ViTGPT2ForConditionalGeneration(ViTGPT2Config(**DEFAULT_SCRATCH_MODEL, vocab_size=vocab_size))
    return sum(parameter.numel() for parameter in model.parameters())


def test_flags_change_the_default_job_and_nothing_else(train_script):
    model_args, data_args, peft_args, training_args = train_script.parse_arguments(
        ["--output_dir", "x", "--num_train_epochs", "1"]
    )
    bare = train_script.parse_arguments([])
    assert training_args.output_dir == "x" and training_args.num_train_epochs == 1
    assert (model_args, data_args, peft_args) == bare[:3]
    assert data_args.uses_synthetic and model_args.model_config is None
    for name in ("learning_rate", "per_device_train_batch_size", "warmup_steps", "num_beams", "max_length", "seed"):
        assert getattr(training_args, name) == getattr(bare[3], name), name


def test_a_config_file_comes_first_and_flags_override_it(train_script, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 3e-5\nnum_train_epochs: 2\npeft: lora\nmodel_config: {n_layer: 2}\n")
    model_args, _, peft_args, training_args = train_script.parse_arguments(
        [str(config), "--learning_rate", "1e-4", "--max_new_tokens", "9"]
    )
    assert training_args.learning_rate == 1e-4 and training_args.num_train_epochs == 2 and peft_args.peft == "lora"
    assert json.loads(model_args.model_config) == {"n_layer": 2}  # as `--model_config '{"n_layer": 2}'` gives it
    assert training_args.generation_settings() == {"num_beams": 3, "max_length": 40, "max_new_tokens": 9}
    # The shipped course recipe parses too.
    _, _, peft_args, training_args = train_script.parse_arguments([str(REPO / "configs" / "course_lora.yaml")])
    assert peft_args.peft == "lora" and training_args.learning_rate == 3e-5


def test_filling_in_defaults_returns_new_arguments_and_leaves_the_given_ones(train_script, tmp_path):
    from modeling_vitgpt2.training.peft_methods import resolve_method
    from modeling_vitgpt2.training.run import _streamed_training_args, load_caption_data

    _, data_args, peft_args, _ = train_script.parse_arguments([
        "--synthetic_dir", str(tmp_path / "shapes"), "--synthetic_train_images", "4", "--synthetic_val_images", "2",
        "--synthetic_image_size", "16"])
    given = copy.deepcopy((data_args, peft_args))
    method, resolved = resolve_method(peft_args, from_scratch=True)
    assert (method, resolved.train_encoder) == ("full", True)
    with contextlib.ExitStack() as held:
        _, val_images = load_caption_data(data_args, held)  # writes and reads the synthetic set
    assert len(val_images) == 2
    assert (data_args, peft_args) == given

    _, data_args, _, training_args = train_script.parse_arguments(["--train_shards", "a.tar", "--max_steps", "2"])
    streamed = _streamed_training_args(data_args, training_args)
    assert streamed.accelerator_config.dispatch_batches is False
    assert training_args.accelerator_config.dispatch_batches is None


def _synthetic_arguments(train_script, root, *flags):
    return train_script.parse_arguments(["--synthetic_dir", str(root), "--synthetic_train_images", "3",
                                         "--synthetic_val_images", "2", "--synthetic_image_size", "16", *flags])[1]


def test_train_py_runs_that_share_a_synthetic_dir_write_it_once(train_script, tmp_path, monkeypatch):
    # Every run wrote the whole set again, over the images another run was reading.
    from modeling_vitgpt2.data import synthetic
    from modeling_vitgpt2.training.run import load_caption_data

    root = tmp_path / "shapes"
    original, written = synthetic.write_synthetic_coco, []
    monkeypatch.setattr(synthetic, "write_synthetic_coco",
                        lambda *args, **kwargs: written.append(kwargs) or original(*args, **kwargs))
    data_args = _synthetic_arguments(train_script, root)
    lines = []
    with contextlib.ExitStack() as first, contextlib.ExitStack() as second:
        first_rows = load_caption_data(data_args, first, lines.append)
        second_rows = load_caption_data(data_args, second, lines.append)  # while the first still trains
    assert written == [data_args.synthetic_options()]
    assert lines == [f"writing the synthetic 'shapes' set (3 training and 2 validation images) to {root}"]
    assert [rows.to_list() for rows in first_rows] == [rows.to_list() for rows in second_rows]
    assert json.loads((root / "written.json").read_text()) == data_args.synthetic_options()

    # The marker, not the files being there, says which set the folder holds: other options write it again.
    with contextlib.ExitStack() as held:
        _, val_images = load_caption_data(_synthetic_arguments(train_script, root, "--synthetic_val_images", "3"),
                                          held, lines.append)
    assert len(written) == 2 and len(val_images) == 3


def test_a_synthetic_set_a_training_run_reads_is_not_rewritten_with_other_options(train_script, tmp_path):
    from modeling_vitgpt2.training.run import load_caption_data
    from modeling_vitgpt2.utils.errors import UserError

    root = tmp_path / "shapes"
    other = _synthetic_arguments(train_script, root, "--synthetic_domain", "shifted")
    with contextlib.ExitStack() as held:
        load_caption_data(_synthetic_arguments(train_script, root), held)
        files = {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}
        with pytest.raises(UserError, match=rf"^{re.escape(str(root))} holds the synthetic set of another running "
                                            r"study or training run \(.*'domain': 'shapes'.*\); writing this "
                                            r"training run's \(.*'domain': 'shifted'.*\) there would change the "
                                            r"images under it: wait for that one to finish, or set --synthetic_dir "
                                            r"to another folder$"):
            load_caption_data(other, contextlib.ExitStack())
        assert {path: path.read_bytes() for path in root.rglob("*") if path.is_file()} == files
    with contextlib.ExitStack() as held:  # once the first run ended
        rows, _ = load_caption_data(other, held)
    assert rows["caption"][0].startswith("the image shows")  # the "shifted" domain's wording


def test_a_read_only_synthetic_dir_that_holds_the_set_is_read_and_one_without_it_is_refused(train_script, tmp_path,
                                                                                           monkeypatch):
    # A set prepared in a read-only folder stopped every train.py run on "Permission denied" for its lock files.
    from test_synthetic import refuse_lock_file_writes

    from modeling_vitgpt2.training.run import load_caption_data
    from modeling_vitgpt2.utils.errors import UserError

    root = tmp_path / "shapes"
    with contextlib.ExitStack() as held:
        load_caption_data(_synthetic_arguments(train_script, root), held, lambda line: None)
    for lock in root.glob(".synthetic.*"):
        lock.unlink()
    refuse_lock_file_writes(monkeypatch, root)
    lines = []
    with contextlib.ExitStack() as held:
        _, val_images = load_caption_data(_synthetic_arguments(train_script, root), held, lines.append)
    assert len(val_images) == 2 and lines == [f"using the synthetic set in {root} without locks: its lock files "
                                              "cannot be created there (a read-only folder?), and it holds the set "
                                              "of these options"]
    with pytest.raises(UserError, match=rf"^cannot write the synthetic set of this training run \(.*\) to "
                                        rf"{re.escape(str(root))} \(.*\): set --synthetic_dir to a folder this user "
                                        r"can write$"):
        load_caption_data(_synthetic_arguments(train_script, root, "--synthetic_val_images", "3"),
                          contextlib.ExitStack())


def test_a_training_run_holds_its_synthetic_set_until_it_returns(train_script, tmp_path, capsys):
    from transformers import TrainerCallback

    from modeling_vitgpt2.data.synthetic import synthetic_set
    from modeling_vitgpt2.training.run import run_training
    from modeling_vitgpt2.utils.errors import UserError

    root, refused = tmp_path / "shapes", []
    shifted = {"num_train": 3, "num_val": 2, "image_size": 16, "domain": "shifted"}

    class OtherOptionsAtTheEnd(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            with pytest.raises(UserError, match=re.escape(f"{root} holds the synthetic set")):
                with synthetic_set(root, shifted):
                    pass
            refused.append(state.global_step)

    arguments = train_script.parse_arguments([
        "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--synthetic_dir", str(root), "--synthetic_train_images", "3",
        "--synthetic_val_images", "2", "--synthetic_image_size", "16", "--model_config", '{"n_layer": 1}',
        "--use_cpu", "--disable_tqdm", "true", "--report_to", "none", "--max_eval_images", "1",
        "--generation_num_beams", "1", "--max_new_tokens", "2"])  # the final evaluation, as short as it goes
    run_training(*arguments, callbacks=[OtherOptionsAtTheEnd()])
    assert refused == [1]
    assert f"[train] writing the synthetic 'shapes' set (3 training and 2 validation images) to {root}" in (
        capsys.readouterr().out)
    with synthetic_set(root, shifted, lambda message: None):  # released once the run returned
        assert json.loads((root / "written.json").read_text())["domain"] == "shifted"


def test_a_config_file_with_an_unknown_option_is_refused_naming_it(train_script, tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("learning_rate: 1e-4\nlearnig_rate: 1e-3\n")
    with pytest.raises(ValueError, match=r"typo.yaml: unknown option\(s\) learnig_rate"):
        train_script.parse_arguments([str(config)])


def test_generation_names_agree_or_are_refused(train_script):
    *_, training_args = train_script.parse_arguments(["--generation_num_beams", "2", "--max_length", "12"])
    assert training_args.num_beams == training_args.generation_num_beams == 2
    assert training_args.max_length == training_args.generation_max_length == 12
    with pytest.raises(ValueError, match="disagree"):
        train_script.parse_arguments(["--num_beams", "2", "--generation_num_beams", "4"])


def test_first_steps_predict_the_run_time_and_warn_when_it_is_long(capsys):
    from types import SimpleNamespace

    from modeling_vitgpt2.training.run import RunTimeEstimate

    ticks = iter([0.0, 6.0])  # 3 steps measured after the first: 2 s per step
    estimate = RunTimeEstimate(trainable=1_000, total=422_000_000, clock=lambda: next(ticks))
    for step in (1, 4):
        estimate.on_step_end(None, SimpleNamespace(global_step=step, max_steps=2_004, is_world_process_zero=True), None)
    assert estimate.estimate == pytest.approx(4_000)
    out = capsys.readouterr().out
    assert "about 67 min for the remaining 2,000 of 2,004 steps" in out
    assert "WARNING: this run is long: 422,000,000 parameters (1,000 trained)" in out

    ticks = iter([0.0, 3.0])
    short = RunTimeEstimate(trainable=10, total=10, clock=lambda: next(ticks))
    for step in (1, 4):
        short.on_step_end(None, SimpleNamespace(global_step=step, max_steps=10, is_world_process_zero=True), None)
    assert "WARNING" not in capsys.readouterr().out


def test_default_pipeline_end_to_end_at_reduced_size(tmp_path):
    """`python train.py` with flags only, shrunk: the built-in default job writes the synthetic set, trains the
    default small model from scratch, evaluates CIDEr, and leaves a folder that captions new synthetic images
    through `from_pretrained`."""
    output_dir = tmp_path / "default"
    command = [
        sys.executable, "train.py", "--output_dir", str(output_dir), "--num_train_epochs", "1",
        "--synthetic_dir", str(tmp_path / "shapes"), "--synthetic_train_images", "40", "--synthetic_val_images", "6",
        "--disable_tqdm", "true", "--max_new_tokens", "12",
    ]
    result = subprocess.run(command, cwd=REPO, env=environment(), check=True, capture_output=True, text=True)
    assert "s per step: about" in result.stdout and "NOTE" not in result.stdout

    metrics = json.loads((output_dir / "eval_results.json").read_text())
    assert metrics["eval_images"] == 6 and 0.0 <= metrics["eval_cider"]
    summary = json.loads((output_dir / "training_summary.json").read_text())
    vocab_size = json.loads((output_dir / "config.json").read_text())["vocab_size"]
    assert summary["total_parameters"] == summary["trainable_parameters"] == default_model_size(vocab_size)
    assert summary["total_parameters"] < 3_000_000  # the small default, never the 422M ViT-L/14 + GPT-2
    assert json.loads((output_dir / "generation_config.json").read_text())["max_new_tokens"] == 12
    script = (
        "import sys, json\n"
        "from modeling_vitgpt2 import ViTGPT2ForConditionalGeneration, ViTGPT2Processor\n"
        "from modeling_vitgpt2.data.synthetic import draw_scene, random_scene\n"
        "import random\n"
        "model = ViTGPT2ForConditionalGeneration.from_pretrained(sys.argv[1]).eval()\n"
        "processor = ViTGPT2Processor.from_pretrained(sys.argv[1])\n"
        "image = draw_scene(random_scene(random.Random(123)), 64)\n"
        "ids = model.generate(pixel_values=processor(images=image)['pixel_values'])\n"
        "print(json.dumps(processor.batch_decode(ids)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(output_dir)], cwd=REPO, env=environment(),
                            capture_output=True, text=True, check=True)
    caption = json.loads(result.stdout.strip().splitlines()[-1])[0]
    assert isinstance(caption, str) and caption


def test_a_from_scratch_model_of_another_size_says_so_up_front(tmp_path):
    output_dir = tmp_path / "wider"
    command = [
        sys.executable, "train.py", "--output_dir", str(output_dir), "--max_steps", "1", "--eval_strategy", "no",
        "--save_strategy", "no", "--load_best_model_at_end", "false", "--model_config", '{"n_layer": 4}',
        "--synthetic_dir", str(tmp_path / "shapes"), "--synthetic_train_images", "8", "--synthetic_val_images", "2",
        "--disable_tqdm", "true",
    ]
    result = subprocess.run(command, cwd=REPO, env=environment(), check=True, capture_output=True, text=True)
    total = json.loads((output_dir / "training_summary.json").read_text())["total_parameters"]
    assert f"NOTE: training a model of {total:,} parameters from scratch, not the built-in default's" in result.stdout


def _parse_config(train_script, tmp_path, text: str, *flags: str, suffix: str = ".yaml"):
    config = tmp_path / f"run{suffix}"
    config.write_text(text)
    return train_script.parse_arguments([str(config), *flags])


def _outcome(train_script, argv: list[str], capsys):
    """What parsing `argv` gives: the arguments, the parser's error line (argparse exits with status 2), or the
    argument classes' own error."""
    try:
        return train_script.parse_arguments(argv)
    except ValueError as error:
        return [f"ValueError: {error}"]
    except SystemExit as error:
        assert error.code == 2
        return [line for line in capsys.readouterr().err.splitlines() if "error:" in line]


def test_a_config_file_takes_no_for_a_strategy_as_the_flags_do(train_script, tmp_path):
    # YAML 1.1 reads no/yes/on/off as booleans: `eval_strategy: no` was refused as "False is not a valid
    # IntervalStrategy" although `--eval_strategy no` is what --help documents.
    *_, training_args = _parse_config(train_script, tmp_path,
                                      "eval_strategy: no\nsave_strategy: no\nload_best_model_at_end: false\n")
    assert (training_args.eval_strategy, training_args.save_strategy) == ("no", "no")
    assert training_args.load_best_model_at_end is False
    *_, training_args = _parse_config(train_script, tmp_path, "merge: True\nload_best_model_at_end: FALSE\n")
    assert training_args.merge is True and training_args.load_best_model_at_end is False


@pytest.mark.parametrize("text, flags", [
    ("lora_target_modules: c_attn\n", ["--lora_target_modules", "c_attn"]),  # a list field given one value
    ("lora_target_modules: [c_attn, c_proj]\n", ["--lora_target_modules", "c_attn", "c_proj"]),
    ("per_device_train_batch_size: 2.5\n", ["--per_device_train_batch_size", "2.5"]),  # a float for an int
    ("lora_rank: 8.0\n", ["--lora_rank", "8.0"]),
    ("max_steps: 1e3\n", ["--max_steps", "1e3"]),  # refused by both: int('1e3') fails
    ("learning_rate: 1e-2\nwarmup_steps: 5\n", ["--learning_rate", "1e-2", "--warmup_steps", "5"]),
    ("learning_rate: [1, 2]\n", None),  # a list for a float: refused naming the option
    ("num_train_epochs: '3'\nmerge: 'false'\n", ["--num_train_epochs", "3", "--merge", "false"]),
    ("seed: true\n", ["--seed", "true"]),  # a boolean for an int
    ("eval_strategy: yes\n", ["--eval_strategy", "yes"]),  # a string as the flag's, an invalid strategy
])
def test_config_file_values_convert_and_fail_as_the_same_flags_do(train_script, tmp_path, capsys, text, flags):
    (tmp_path / "run.yaml").write_text(text)
    from_file = _outcome(train_script, [str(tmp_path / "run.yaml")], capsys)
    if flags is None:
        assert isinstance(from_file, list) and len(from_file) == 1, from_file
        assert "argument --learning_rate/--learning-rate: expected one argument" in from_file[0]
        return
    assert from_file == _outcome(train_script, flags, capsys)


def test_flags_override_a_config_files_lists_and_booleans(train_script, tmp_path):
    text = "lora_target_modules: [c_attn, c_proj]\nload_best_model_at_end: true\nlearning_rate: 1e-2\n"
    _, _, peft_args, training_args = _parse_config(
        train_script, tmp_path, text, "--lora_target_modules", "c_fc", "--no_load_best_model_at_end",
        "--eval_strategy", "no", "--save_strategy", "no")
    assert peft_args.lora_target_modules == ["c_fc"]
    assert training_args.load_best_model_at_end is False and training_args.learning_rate == 0.01


def test_null_in_a_config_file_unsets_an_optional_setting_and_is_refused_for_others(train_script, tmp_path, capsys):
    _, _, peft_args, training_args = _parse_config(
        train_script, tmp_path, "save_total_limit: null\nmax_new_tokens: ~\nlora_target_modules: null\n")
    assert training_args.save_total_limit is None and peft_args.lora_target_modules is None
    assert training_args.max_new_tokens is None
    # ... and a flag still overrides it
    *_, training_args = _parse_config(train_script, tmp_path, "save_total_limit: null\n", "--save_total_limit", "3")
    assert training_args.save_total_limit == 3
    with pytest.raises(SystemExit):
        _parse_config(train_script, tmp_path, "learning_rate: null\n")
    assert "argument --learning_rate/--learning-rate: takes a value, not null" in capsys.readouterr().err


def test_a_json_config_file_parses_as_the_yaml_one(train_script, tmp_path):
    settings = {"eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False,
                "lora_target_modules": "c_attn", "learning_rate": 2e-5, "save_total_limit": None,
                "model_config": {"n_layer": 2}}
    model_args, _, peft_args, training_args = _parse_config(
        train_script, tmp_path, json.dumps(settings), "--num_train_epochs", "2", suffix=".json")
    assert peft_args.lora_target_modules == ["c_attn"]
    assert (training_args.eval_strategy, training_args.load_best_model_at_end) == ("no", False)
    assert training_args.learning_rate == 2e-5 and training_args.save_total_limit is None
    assert training_args.num_train_epochs == 2
    assert json.loads(model_args.model_config) == {"n_layer": 2}


def test_a_study_takes_and_refuses_recipe_and_variant_values_as_train_py_does(tmp_path):
    from modeling_vitgpt2.applications.study import StudyConfigError, load_study

    def study(recipe: str, variant: str = "") -> str:
        path = tmp_path / "study.yaml"
        path.write_text(f"base: {{model: {tmp_path / 'base'}}}\nrecipe:\n  num_train_epochs: 1\n{recipe}"
                        f"variants:\n  - {{name: lora, peft: lora{variant}}}\nmetrics: [cider]\n")
        return path

    loaded = load_study(study("  eval_strategy: no\n  save_strategy: no\n  load_best_model_at_end: false\n",
                              ", lora_target_modules: c_attn"))
    assert loaded.recipe["eval_strategy"] == "no"
    for recipe, variant, message in (
        ("  per_device_train_batch_size: 2.5\n", "", "recipe.per_device_train_batch_size has invalid int value: '2.5'"),
        ("", ", lora_rank: 8.0", "variants[0].lora_rank has invalid int value: '8.0'"),
        ("  learning_rate: [1, 2]\n", "", "recipe.learning_rate has expected one argument"),
    ):
        with pytest.raises(StudyConfigError) as error:
            load_study(study(recipe, variant))
        assert f"study file {tmp_path / 'study.yaml'}: {message}" in str(error.value)
