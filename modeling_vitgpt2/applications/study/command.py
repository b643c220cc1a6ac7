"""Run a whole PEFT study in one command and write one report: fine-tune a base captioner with several methods,
score every variant with the metric registry, compare CLIP prompt templates, and draw the best and worst captions'
attention maps.

`vitgpt2 study [STUDY.yaml] [--output_dir DIR]`: the command line of the study (the file's format: the package's
docstring, `modeling_vitgpt2/applications/study/__init__.py`)."""

from __future__ import annotations

import argparse
import logging

from ...utils.errors import run_command
from .config import BUILTIN_STUDY, load_study
from .run import run_study

__all__ = ["main"]


def main(argv: list[str] | None = None, prog: str = "vitgpt2 study") -> int:
    """Runs a study; the exit status: 0, 1 when a variant failed (the report says which), 2 for a bad study file."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", nargs="?", help=f"study YAML (default: the built-in {BUILTIN_STUDY.name})")
    parser.add_argument("--output_dir", help="where variants, caches and the report go (default: the study's "
                                             "output_dir, else outputs/study-<name>)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def run() -> int:
        study = load_study(args.study or BUILTIN_STUDY)
        output_dir = args.output_dir or study.output_dir or f"outputs/study-{study.name}"
        results = run_study(study, output_dir, show_progress=not args.quiet)
        return 0 if all(row["status"] == "ok" for row in results["rows"]) else 1

    return run_command(prog, run)

