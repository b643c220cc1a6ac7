"""One command line: `vitgpt2 <command>` dispatches to every job, and every entry point reports a user error the same
way (one line, exit status 2; VITGPT2_TRACEBACK=1 shows the traceback)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from modeling_vitgpt2.cli.main import COMMANDS, main


def vitgpt2(*argv, cwd, traceback=False):
    """`vitgpt2 ...` as a user runs it, in a fresh process (`python -m modeling_vitgpt2.cli` is the same command)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "VITGPT2_TRACEBACK": "1" if traceback else "0"}
    return subprocess.run([sys.executable, "-m", "modeling_vitgpt2.cli", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in COMMANDS)


def test_no_command_or_an_unknown_one_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage: vitgpt2 <command>" in capsys.readouterr().err
    assert main(["trian"]) == 2
    assert capsys.readouterr().err.strip() == (
        "vitgpt2: error: unknown command 'trian'; choose one of train, eval, study, demo, hub, convert")


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_answers_help_with_its_own_name(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: vitgpt2 {name}")


@pytest.mark.parametrize("argv, message", [
    (["train", "missing.yaml"], "vitgpt2 train: error: config file not found: missing.yaml"),
    (["eval", "caption", "--model", "no-such-model", "--images", "no-such-folder", "--output", "p.json"],
     "vitgpt2 eval caption: error: "),
    (["study", "missing.yaml"], "vitgpt2 study: error: "),
    (["demo"], "vitgpt2 demo: error: no model at outputs/synthetic-default"),
    (["hub", "card", "no-such-run"], "vitgpt2 hub card: error: "),
    (["convert", "no-such-model", "out"], "vitgpt2 convert: error: "),
], ids=lambda value: value[0] if isinstance(value, list) else None)
def test_user_errors_are_one_line_and_status_2_everywhere(argv, message, tmp_path):
    result = vitgpt2(*argv, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(message) and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "p.json").exists()


def test_vitgpt2_traceback_shows_where_the_error_came_from(tmp_path):
    result = vitgpt2("train", "missing.yaml", cwd=tmp_path, traceback=True)
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert "FileNotFoundError: config file not found: missing.yaml" in result.stderr


def test_the_scripts_at_the_top_are_the_same_commands(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "missing.yaml"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "train.py: error: config file not found: missing.yaml"
