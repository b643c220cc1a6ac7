"""The study's report: results.json, results.csv, report.md with its figures, and a self-contained report.html."""

from __future__ import annotations

import base64
import csv
import io
import json
import mimetypes
import re
import shutil
from pathlib import Path

from ...evaluation.metrics import format_metric, metric_names
from ...utils.io import write_json_atomic, write_text_atomic
from .config import BASE_ROW

__all__ = ["TABLE_METRICS", "format_duration", "write_report"]

# The headline columns of the PEFT table (all registry values are in results.json / results.csv).
TABLE_METRICS = ("cider", "clip_score", "bleu_4", "rouge_l", "meteor")


def format_duration(seconds: float) -> str:
    """`42s`, `3m05s`: the study's progress lines and its report."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _table_rows(results: dict) -> tuple[list[str], list[dict]]:
    """The PEFT table's columns (only metrics some row has) and one dict of display strings per row."""
    names = metric_names()
    present = [key for key in TABLE_METRICS if any(key in row.get("metrics", {}) for row in results["rows"])]
    table = []
    for row in results["rows"]:
        ok = row["status"] == "ok"
        total = row.get("total_parameters") or 0
        trainable = row.get("trainable_parameters")
        peak = row.get("peak_memory_bytes")
        cells = {
            "Variant": row["name"],
            "Settings": ", ".join(f"{k}={v}" for k, v in row["settings"].items()) or "-",
            "Trainable": f"{trainable:,}" if ok else "-",
            "Trainable %": f"{100 * trainable / total:.3f}" if ok and total else "-",
        }
        for key in present:
            value = row.get("metrics", {}).get(key)
            cells[names[key]] = format_metric(key, value) if value is not None else "-"
        cells["Train time"] = format_duration(row["train_runtime_s"]) if ok and row.get("train_runtime_s") else "-"
        cells["Peak memory"] = f"{peak / 2 ** 20:,.0f} MiB" if peak else "-"
        cells["Best epoch"] = f"{row['best_epoch']:g}" if row.get("best_epoch") is not None else "-"
        cells["Status"] = "ok" if ok else f"FAILED: {row['error']}"
        table.append(cells)
    return [names[key] for key in present], table


def _figures(results: dict, output_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures_dir = output_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    rows = [row for row in results["rows"] if row["status"] == "ok"]
    variants = [row for row in rows if row["name"] != BASE_ROW]
    base = next((row for row in rows if row["name"] == BASE_ROW), None)
    written = {}

    figure, axis = plt.subplots(figsize=(6, 4))
    for row in variants:
        axis.scatter(row["trainable_parameters"], row["metrics"].get("cider", 0), s=40)
        axis.annotate(row["name"], (row["trainable_parameters"], row["metrics"].get("cider", 0)),
                      textcoords="offset points", xytext=(5, 4), fontsize=8)
    if base:
        axis.axhline(base["metrics"].get("cider", 0), color="grey", linestyle="--", label="base, before fine-tuning")
        axis.legend(fontsize=8)
    axis.set_xscale("log")
    axis.set(xlabel="trainable parameters (log scale)", ylabel="CIDEr", title="CIDEr against trainable parameters")
    written["cider_vs_parameters"] = _save_figure(figure, figures_dir / "cider_vs_parameters.png")

    figure, axis = plt.subplots(figsize=(6, 4))
    for row in variants:
        points = [(entry["epoch"], entry["eval_cider"]) for entry in row["log_history"] if "eval_cider" in entry]
        if points:
            axis.plot(*zip(*points), marker="o", label=row["name"])
    if base:
        axis.axhline(base["metrics"].get("cider", 0), color="grey", linestyle="--", label="base")
    axis.set(xlabel="epoch", ylabel="validation CIDEr", title="Validation CIDEr per epoch")
    axis.legend(fontsize=8)
    written["val_cider_per_epoch"] = _save_figure(figure, figures_dir / "val_cider_per_epoch.png")

    figure, axis = plt.subplots(figsize=(6, 4))
    for row in variants:
        points = [(entry["step"], entry["loss"]) for entry in row["log_history"] if "loss" in entry]
        if points:
            axis.plot(*zip(*points), label=row["name"])
    axis.set(xlabel="step", ylabel="training loss", title="Training loss per step")
    axis.legend(fontsize=8)
    written["train_loss"] = _save_figure(figure, figures_dir / "train_loss.png")
    return written


def _save_figure(figure, path: Path) -> Path:
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=110)
    temporary.replace(path)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def _results_csv(results: dict, output_dir: Path) -> None:
    keys = list(metric_names())
    header = ["variant", "status", "settings", "method", "trainable_parameters", "total_parameters",
              "trainable_percent", *keys, "train_runtime_s", "peak_memory_bytes", "best_epoch", "error"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for row in results["rows"]:
        total = row.get("total_parameters")
        trainable = row.get("trainable_parameters")
        metrics = row.get("metrics", {})
        writer.writerow([row["name"], row["status"], json.dumps(row["settings"]), row.get("method", ""),
                         trainable if trainable is not None else "", total or "",
                         100 * trainable / total if total and trainable is not None else "",
                         *[metrics.get(key, "") for key in keys], row.get("train_runtime_s", ""),
                         row.get("peak_memory_bytes") or "", row.get("best_epoch", ""), row.get("error", "")])
    write_text_atomic(output_dir / "results.csv", buffer.getvalue())


def _markdown_cell(value) -> str:
    # A table row is one line: a line break (a failed variant's error often has several) would end the table there.
    return " ".join(str(value).splitlines()).replace("|", "\\|")


def _markdown_table(columns: list[str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_markdown_cell(row.get(column, "")) for column in columns) + " |")
    return "\n".join(lines)


def write_report(results: dict, output_dir) -> None:
    """Writes results.json, results.csv, report.md (figures beside it) and a self-contained report.html."""
    output_dir = Path(output_dir)
    figures = _figures(results, output_dir)
    metric_columns, table = _table_rows(results)
    columns = ["Variant", "Settings", "Trainable", "Trainable %", *metric_columns, "Train time", "Peak memory",
               "Best epoch", "Status"]
    images_dir = output_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for entry in results["side_by_side"]:
        copy = images_dir / Path(entry["image"]).name
        shutil.copyfile(entry["image"], copy)
        entry["report_image"] = str(copy.relative_to(output_dir))

    names = metric_names()
    ok_rows = [row for row in results["rows"] if row["status"] == "ok"]
    peak_kind = next((row["peak_memory_kind"] for row in ok_rows if row.get("peak_memory_kind")), "")
    skipped = sorted({f"{name}: {reason}" for row in ok_rows for name, reason in row.get("skipped", {}).items()})
    sections: list[tuple[str, list]] = []  # (title, [("md", text) | ("img", path, alt) | ("table", cols, rows)])
    intro = (f"Study `{results['study']}` from `{results['study_file']}`; {len(results['rows']) - 1} variants, "
             f"wall time {format_duration(results['study_wall_time_s'])} on {results['machine']['processor']} "
             f"({results['machine']['cpu_cores']} cores, {results['machine']['cpu_threads']} torch threads"
             + (f", {results['machine']['gpu']}" if results["machine"]["gpu"] else ", no GPU")
             + (f", load average {results['machine']['load_average'][0]:.1f} at the end"
                if results["machine"].get("load_average") else "") + "). "
             "Every score below is `eval.py score` on the variant's saved predictions "
             "(`variants/<name>/eval_predictions.json`, scores in `variants/<name>/scores.json`).")
    sections.append(("PEFT methods", [
        ("md", intro),
        ("table", columns, table),
        ("md", "The first row is the base model before fine-tuning. Trainable % is of all parameters"
               + (f"; peak memory is the {peak_kind}" if peak_kind else "")  # none when no variant trained
               + ". All metrics of every row: `results.csv`, `results.json`."
               + (" Not computed: " + "; ".join(skipped) if skipped else "")),
        ("img", figures["cider_vs_parameters"], "CIDEr against trainable parameters"),
        ("img", figures["val_cider_per_epoch"], "Validation CIDEr per epoch"),
        ("img", figures["train_loss"], "Training loss per step"),
    ]))
    zero_shot = results.get("zero_shot")
    if zero_shot:
        zs_rows = [{"Template": template, "Accuracy": f"{accuracy:.4f}"}
                   for template, accuracy in zero_shot["accuracy"].items()]
        sections.append(("CLIP zero-shot prompt templates", [
            ("md", f"{zero_shot['num_images']} images, CLIP `{zero_shot['clip_model']}`; the ensemble averages the "
                   "templates' text embeddings."),
            ("table", ["Template", "Accuracy"], zs_rows)]))
    else:
        sections.append(("CLIP zero-shot prompt templates", [
            ("md", "Not part of this study (add a `zero_shot` section and a `clip_model`).")]))
    extremes = results.get("extremes")
    if extremes and extremes.get("not_drawn"):
        sections.append(("Best and worst captions, with per-word attention maps", [
            ("md", f"Not drawn: {extremes['not_drawn']} (see the Status column above); a rerun retries the failed "
                   "variants and draws them.")]))
    elif extremes:
        by = names[extremes["by"]]
        items: list = [("md", f"Variant `{extremes['variant']}`, ranked by per-image {by}"
                              + ("" if extremes["by"] == "clip_score" else " (no CLIP model in this study)") + ".")]
        for kind in ("best", "worst"):
            for entry in extremes[kind]:
                note = "" if entry["attention_caption"] == entry["caption"] else (
                    f" (maps drawn for the re-generated caption \"{entry['attention_caption']}\")")
                items.append(("md", f"**{kind} {entry['rank']}** `{entry['name']}`, {by} "
                                    f"{format_metric(extremes['by'], entry[extremes['by']])}: "
                                    f"\"{entry['caption']}\"{note}"))
                items.append(("img", output_dir / entry["png"], f"{kind} {entry['rank']} attention maps"))
        sections.append((f"Best and worst captions by {by}, with per-word attention maps", items))
    if results["side_by_side"]:
        variant_names = [row["name"] for row in ok_rows]
        items = []
        for entry in results["side_by_side"]:
            items.append(("img", output_dir / entry["report_image"], entry["name"]))
            items.append(("table", ["Source", "Caption"],
                          [{"Source": name, "Caption": entry["captions"].get(name, "")} for name in variant_names]
                          + [{"Source": f"reference {i}", "Caption": ref}
                             for i, ref in enumerate(entry["references"], 1)]))
        sections.append(("Validation images: every variant's caption and the references", items))

    write_json_atomic(output_dir / "results.json", results)
    _results_csv(results, output_dir)
    write_text_atomic(output_dir / "report.md", _render_markdown(results, sections, output_dir))
    write_text_atomic(output_dir / "report.html", _render_html(results, sections))


def _render_markdown(results: dict, sections: list, output_dir: Path) -> str:
    parts = [f"# Study report: {results['study']}"]
    for title, items in sections:
        parts.append(f"## {title}")
        for item in items:
            if item[0] == "md":
                parts.append(item[1])
            elif item[0] == "img":
                parts.append(f"![{item[2]}]({Path(item[1]).relative_to(output_dir).as_posix()})")
            else:
                parts.append(_markdown_table(item[1], item[2]))
    return "\n\n".join(parts) + "\n"


def _render_html(results: dict, sections: list) -> str:
    from html import escape

    def inline(text: str) -> str:
        text = escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    def data_uri(path: Path) -> str:
        kind = mimetypes.guess_type(str(path))[0] or "image/png"
        return f"data:{kind};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"

    body = [f"<h1>Study report: {escape(results['study'])}</h1>"]
    for title, items in sections:
        body.append(f"<h2>{escape(title)}</h2>")
        for item in items:
            if item[0] == "md":
                body.append(f"<p>{inline(item[1])}</p>")
            elif item[0] == "img":
                body.append(f'<img src="{data_uri(item[1])}" alt="{escape(item[2])}">')
            else:
                head = "".join(f"<th>{escape(column)}</th>" for column in item[1])
                rows = "".join("<tr>" + "".join(f"<td>{escape(str(row.get(column, '')))}</td>" for column in item[1])
                               + "</tr>" for row in item[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left}th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0;"
             "image-rendering:auto}code{background:#f3f3f3;padding:0 3px}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Study report: {escape(results['study'])}"
            f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")

