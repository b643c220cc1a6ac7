"""`eval.py` / `vitgpt2 eval`: evaluate a captioner and CLIP from the command line (course problems 1-3).

    python eval.py caption --model outputs/lora --images p2_data/images/val --output preds.json
    python eval.py score --predictions preds.json --annotations p2_data/val.json \\
        --images p2_data/images/val --clip_model openai/clip-vit-base-patch32 --output scores.json
    python eval.py zero-shot --clip_model openai/clip-vit-base-patch32 --images p1_data/val \\
        --labels p1_data/id2label.json --template "This is a photo of {object}." --output zs.json
    python eval.py attention --model outputs/lora --images a.jpg b.jpg --layer 2 --layer 3 --output_dir maps
    python eval.py extremes --predictions preds.json --images p2_data/images/val \\
        --clip_model openai/clip-vit-base-patch32 --model outputs/lora --top_k 1 --output_dir extremes

Run `python eval.py <command> --help` for every option. Bad inputs (a missing folder or file, an unreadable image,
malformed JSON, a bad template or class id, an output that is one of the command's own inputs) stop the command
with a message on stderr and exit status 2, before any output file is written.
"""

import argparse
import sys

from ..utils.errors import run_command

__all__ = ["build_parser", "main", "run"]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def layer_value(text: str):
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a 0-based layer number or 'all', got {text!r}") from None


class LayerAction(argparse.Action):
    """Collects --layer: layer numbers add up to a list (averaged), or a single 'all'."""

    def __call__(self, parser, namespace, value, option_string=None):
        chosen = getattr(namespace, self.dest)
        if chosen is not None and "all" in (chosen, value):
            parser.error("--layer all cannot be combined with other --layer values")
        setattr(namespace, self.dest, value if value == "all" else (chosen or []) + [value])


def add_captioner_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder, Hub id, or peft adapter folder from train.py")
    parser.add_argument("--num_beams", type=positive_int, default=3)
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per generate call")
    parser.add_argument("--max_length", type=positive_int, default=None,
                        help="caption length limit in tokens, start token included (default: the model's "
                             "generation_config)")
    parser.add_argument("--max_new_tokens", type=positive_int, default=None,
                        help="limit on generated tokens; takes precedence over --max_length, as in `generate`")


def add_attention_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layer", type=layer_value, action=LayerAction,
                        help="0-based decoder layer with cross-attention; repeat to average several, or 'all' "
                             "(default: 2 and 3, the report's '3rd-4th layer', where the model has them; else all)")
    parser.add_argument("--head", type=int, default=None, help="0-based attention head (default: mean of the heads)")


def add_clip_prefix(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clip_prefix", default="",
                        help='text before each caption for CLIP: "" (the course, default) or "A photo depicts" '
                             "(Hessel et al.'s CLIP-S)")


def build_parser(prog: str = "eval.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # Imported here, not at the top: the module imports torch, which this file's import keeps off the start-up path.
    from ..inference.loading import QUANTIZATION_CHOICES

    commands = parser.add_subparsers(dest="command", required=True)

    caption = commands.add_parser("caption", help="caption every image in a folder into a predictions JSON")
    add_captioner_options(caption)
    caption.add_argument("--images", required=True, help="folder of images")
    caption.add_argument("--output", required=True, help='predictions JSON: {"<file name without extension>": "..."}')
    caption.add_argument("--quantize", choices=QUANTIZATION_CHOICES,
                         help="int8 inference on the CPU (dynamic int8 linear layers; faster, captions may differ "
                              "slightly from float32); int8-compiled also compiles the vision encoder for the CPU's "
                              "int8 kernels (faster still; tens of seconds at start, needs torchao and a C++ "
                              "compiler)")
    caption.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                         help="bfloat16: faster on CPUs with bfloat16 instructions (avx512_bf16 or AMX; refused "
                              "elsewhere); captions may differ slightly from float32 (default: float32)")
    caption.add_argument("--num_workers", type=non_negative_int, default=None,
                         help="processes decoding images while the model runs (default: one per spare CPU core, "
                              "at most 4; 0 decodes in the main process)")

    score = commands.add_parser("score", help="CIDEr, BLEU-1..4, ROUGE-L, METEOR, caption diversity; CLIPScore and "
                                              "RefCLIPScore with --clip_model")
    score.add_argument("--predictions", required=True)
    score.add_argument("--annotations", required=True, help="COCO-style captions JSON of the same split")
    score.add_argument("--images", help="folder of the annotated images (needed for CLIPScore)")
    score.add_argument("--clip_model",
                       help="CLIP Hub id or folder (CLIPScore is defined with openai/clip-vit-base-patch32)")
    add_clip_prefix(score)
    score.add_argument("--train_annotations",
                       help="COCO-style captions JSON of the training split: adds the share of captions copied from it")
    score.add_argument("--metrics", nargs="+", metavar="NAME",
                       help="registered metrics to compute (default: all): cider bleu rouge_l meteor clip_score "
                            "diversity copied")
    score.add_argument("--output", required=True, help="scores JSON with per-image values")

    zero_shot = commands.add_parser("zero-shot", help="CLIP zero-shot accuracy per prompt template")
    zero_shot.add_argument("--clip_model", required=True)
    zero_shot.add_argument("--images", required=True, help="folder of {class_id}_{n}.png images")
    zero_shot.add_argument("--labels", required=True, help="id2label.json: class id -> class name")
    zero_shot.add_argument("--template", action="append", default=[], dest="templates",
                           help='prompt with an {object} placeholder; repeat for several')
    zero_shot.add_argument("--labels_file", help="ground truth as CSV filename,label or JSON (default: file names)")
    zero_shot.add_argument("--ensemble", action="store_true", help="also the mean of the templates' embeddings")
    zero_shot.add_argument("--batch_size", type=positive_int, default=32)
    zero_shot.add_argument("--output", required=True,
                           help="summary JSON; a filename,label CSV per template is written beside it")

    attention = commands.add_parser("attention", help="per-word cross-attention maps, one PNG per image")
    add_captioner_options(attention)
    attention.add_argument("--images", required=True, nargs="+", help="image files")
    add_attention_options(attention)
    attention.add_argument("--save_arrays", action="store_true", help="also <image>_attention.npz: words and maps")
    attention.add_argument("--output_dir", required=True)

    extremes = commands.add_parser("extremes", help="best and worst captions by CLIPScore, with attention maps")
    add_captioner_options(extremes)
    extremes.add_argument("--predictions", required=True)
    extremes.add_argument("--images", required=True, help="folder of the captioned images")
    extremes.add_argument("--clip_model", required=True)
    add_clip_prefix(extremes)
    extremes.add_argument("--top_k", type=positive_int, default=1)
    add_attention_options(extremes)
    extremes.add_argument("--output_dir", required=True)
    return parser


def run(args) -> None:
    # Imported after parsing, so --help and argument mistakes answer without loading torch.
    from ..evaluation import jobs as evaluation

    layer = getattr(args, "layer", None)

    if args.command == "caption":
        captions = evaluation.caption_folder(args.model, args.images, num_beams=args.num_beams,
                                             batch_size=args.batch_size, max_length=args.max_length,
                                             max_new_tokens=args.max_new_tokens, output=args.output,
                                             quantize=args.quantize, num_workers=args.num_workers,
                                             dtype=args.dtype)
        print(f"captioned {len(captions)} images -> {args.output}")
    elif args.command == "score":
        from ..evaluation.metrics import format_metric, metric_names

        report = evaluation.score_predictions(args.predictions, args.annotations, args.images,
                                              clip_model=args.clip_model, clip_prefix=args.clip_prefix,
                                              train_annotations=args.train_annotations, metrics=args.metrics,
                                              output=args.output)
        for name, reason in report.skipped.items():
            print(f"{name} skipped: {reason}", file=sys.stderr)
        print(" | ".join(f"{display}: {format_metric(key, report.metrics[key])}"
                         for key, display in metric_names().items() if key in report.metrics))
    elif args.command == "zero-shot":
        result, summary = evaluation.run_zero_shot(args.images, args.labels, args.templates, args.output,
                                                   labels_file=args.labels_file, ensemble=args.ensemble,
                                                   clip_model=args.clip_model, batch_size=args.batch_size)
        print(f"accuracy  template ({len(result.filenames)} images)")
        for template, accuracy in summary["accuracy"].items():
            print(f"  {accuracy:.4f}  {template}  -> {summary['predictions_csv'][template]}")
    elif args.command == "attention":
        written = evaluation.write_attention_maps(
            args.model, args.images, args.output_dir, layer=layer, head=args.head,
            num_beams=args.num_beams, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, save_arrays=args.save_arrays)
        for entry in written:
            print(f"{entry['png']}: {entry['caption']}")
    elif args.command == "extremes":
        summary = evaluation.write_extremes(
            args.predictions, args.images, args.model, args.output_dir, clip_model=args.clip_model,
            top_k=args.top_k, clip_prefix=args.clip_prefix, layer=layer, head=args.head,
            num_beams=args.num_beams, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size)
        for kind in ("best", "worst"):
            for entry in summary[kind]:
                print(f"{kind} {entry['rank']}: CLIPScore {entry['clip_score']:.4f}  {entry['name']}: "
                      f"{entry['caption']}")
                if entry["attention_caption"] != entry["caption"]:
                    print(f"  note: the maps show the model's caption {entry['attention_caption']!r}, not the "
                          "prediction; pass the --model and settings that made the predictions", file=sys.stderr)


def main(argv: list[str] | None = None, prog: str = "eval.py") -> int:
    args = build_parser(prog).parse_args(argv)
    return run_command(f"{prog} {args.command}", lambda: run(args))
