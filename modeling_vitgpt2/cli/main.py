"""`vitgpt2 <command> ...`: one console command for every job; each command parses its own options
(`vitgpt2 <command> --help`). Every command reports a user error the same way: one line and exit status 2
(`utils/errors.py`; `VITGPT2_TRACEBACK=1` shows the traceback)."""

from __future__ import annotations

import importlib
import sys

from ..utils.errors import USAGE_ERROR

__all__ = ["COMMANDS", "main"]

# command -> (module whose `main(argv, prog)` runs it, what it does). Modules are imported only when their command
# runs, so `vitgpt2 --help` answers at once and the demo's Gradio is needed only by `vitgpt2 demo`.
COMMANDS = {
    "train": ("modeling_vitgpt2.cli.train", "fine-tune with Trainer and peft (the built-in default job without options)"),
    "eval": ("modeling_vitgpt2.cli.eval", "caption a folder, score predictions, CLIP zero-shot, attention maps, "
                                          "best/worst captions"),
    "study": ("modeling_vitgpt2.applications.study", "run a whole PEFT study and write its report (default: the "
                                                     "built-in synthetic study)"),
    "demo": ("modeling_vitgpt2.applications.demo", "serve the demo page (needs the [demo] extra)"),
    "hub": ("modeling_vitgpt2.applications.hub", "render the model card, push a model or a demo Space"),
    "convert": ("modeling_vitgpt2.model.convert_vision_encoder_decoder",
                "convert a VisionEncoderDecoderModel (ViT + GPT-2) checkpoint"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "usage: vitgpt2 <command> [options]\n\ncommands:\n" + "\n".join(lines) + (
        "\n\n`vitgpt2 <command> --help` lists a command's options.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else USAGE_ERROR
    name, *rest = argv
    if name not in COMMANDS:
        print(f"vitgpt2: error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return USAGE_ERROR
    module_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != "gradio":
            raise
        print(f'vitgpt2 {name}: error: needs Gradio, the [demo] extra: pip install "modeling-vitgpt2[demo]"',
              file=sys.stderr)
        return USAGE_ERROR
    return module.main(rest, prog=f"vitgpt2 {name}")
