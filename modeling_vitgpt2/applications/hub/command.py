"""`vitgpt2 hub card|push|space`: the command line of the Hub publishing."""

from __future__ import annotations

import argparse

from ...utils.errors import run_command
from .card import build_model_card
from .output_folder import ATTENTION_EXAMPLE
from .push import push_to_hub
from .space import push_space

__all__ = ["main"]


def main(argv: list[str] | None = None, prog: str = "vitgpt2 hub") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Render the model card of a train.py output folder, or push the folder to the Hugging Face Hub. "
        f"The token comes from `hf auth login` or HF_TOKEN. Put a picture from attention_maps.draw_attention_maps "
        f"at OUTPUT_DIR/{ATTENTION_EXAMPLE} to show it on the card.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    card_parser = commands.add_parser("card", help="print the rendered model card")
    push_parser = commands.add_parser("push", help="upload the folder with its card in one commit")
    space_parser = commands.add_parser("space", help="push the demo page (app.py) as a Gradio Space, in one commit")
    space_parser.add_argument("model", help="the model repository the Space loads (namespace/name), or a train.py "
                                            "output folder to upload into the Space")
    space_parser.add_argument("--repo_id", required=True, help="namespace/name of the Space")
    space_parser.add_argument("--private", action="store_true", help="create the Space as private")
    space_parser.add_argument("--license", default="apache-2.0", help="license id for the Space (default apache-2.0)")
    for command in (card_parser, push_parser):
        command.add_argument("output_dir", help="the --output_dir of a finished train.py run")
        command.add_argument("--dataset_name", help="Hub id of the dataset trained and evaluated on")
        command.add_argument("--license", default="apache-2.0", help="license id for the card (default apache-2.0)")
        command.add_argument(
            "--base_model", action="append", dest="base_models", help="Hub id the model was built from (repeatable)"
        )
    card_parser.add_argument("--repo_id", help="namespace/name the usage snippets load from")
    for command in (card_parser, push_parser):
        command.add_argument("--space", dest="space_id", help="namespace/name of a Space with the demo page for this "
                                                              "model (`space` pushes one); the card links it")
    push_parser.add_argument("--repo_id", required=True, help="namespace/name of the model repository")
    push_parser.add_argument("--private", action="store_true", help="create the repository as private")
    push_parser.add_argument(
        "--include_checkpoints", action="store_true", help="also upload the checkpoint-* folders (for resuming)"
    )
    push_parser.add_argument("--commit_message", help="default: the model name, method and CIDEr")
    args = parser.parse_args(argv)
    return run_command(f"{prog} {args.command}", lambda: run(args))


def run(args: argparse.Namespace) -> None:
    if args.command == "card":
        print(build_model_card(args.output_dir, args.repo_id, args.dataset_name, args.license, args.base_models,
                               space_id=args.space_id))
        return
    if args.command == "space":
        commit = push_space(args.model, args.repo_id, private=args.private, license=args.license)
        print(f"pushed the demo page for {args.model} to https://huggingface.co/spaces/{args.repo_id} "
              f"({commit.commit_url})")
        return
    commit = push_to_hub(
        args.output_dir,
        args.repo_id,
        private=args.private,
        include_checkpoints=args.include_checkpoints,
        commit_message=args.commit_message,
        dataset_name=args.dataset_name,
        license=args.license,
        base_models=args.base_models,
        space_id=args.space_id,
    )
    print(f"pushed {args.output_dir} to https://huggingface.co/{args.repo_id} ({commit.commit_url})")
