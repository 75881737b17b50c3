"""The job's report: what was explained, the model's accuracy against the data's labels, one
row per method of merged scores, and the mean curves as a PNG (every file written atomically).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from ..metrics import CHEFER_FRACTIONS, RISE_FRACTIONS
from .store import JobResults, write_atomic, write_json

#: (key, column title, scale) in the order of the table; a column shows when its key exists.
COLUMNS = (
    ("positive_auc", "pos. AUC ↓", 1),
    ("negative_auc", "neg. AUC ↑", 1),
    ("deletion_auc", "deletion ↓", 100),
    ("insertion_auc", "insertion ↑", 100),
    ("comprehensiveness", "compr. ↑", 100),
    ("sufficiency", "suff. ↓", 100),
    ("token_f1", "token F1 ↑", 100),
    ("pointing", "pointing ↑", 100),
    ("pixel_accuracy", "pixel acc ↑", 100),
    ("miou", "mIoU ↑", 100),
    ("ap", "AP ↑", 100),
    ("ms_per_example", "ms / example", 1),
)
_POOLED = ("intersection_background", "intersection_object", "union_background", "union_object")
#: Per curve: title (↓: a lower curve is better, ↑: a higher one), fractions, y label.
CURVE_TITLES = {
    "positive": (
        "positive perturbation ↓\n(most relevant removed first)",
        CHEFER_FRACTIONS,
        "top-1 accuracy",
    ),
    "negative": (
        "negative perturbation ↑\n(least relevant removed first)",
        CHEFER_FRACTIONS,
        "top-1 accuracy",
    ),
    "deletion": ("deletion (RISE) ↓\n(most relevant removed first)", RISE_FRACTIONS, "probability"),
    "insertion": (
        "insertion (RISE) ↑\n(most relevant inserted first)",
        RISE_FRACTIONS,
        "probability",
    ),
}


def summarize(results: JobResults) -> dict[str, dict[str, float]]:
    """``{method: {metric: value}}``: means over the examples, the mIoU pooled over pixels
    (Chefer et al.'s definition), and the milliseconds of attribution per example."""
    scores = results.table("score")
    examples = sum(r["examples"][1] - r["examples"][0] for r in results.records)
    summary = {}
    for method in results.methods:
        values = scores[method]
        row = {k: v.double().mean().item() for k, v in values.items() if k not in _POOLED}
        if "intersection_object" in values:
            inter = torch.stack([values["intersection_background"], values["intersection_object"]])
            union = torch.stack([values["union_background"], values["union_object"]])
            row["miou"] = (inter.sum(1) / union.sum(1).clamp(min=1)).mean().item()
        seconds = sum(r["seconds"][method] for r in results.records)
        row["ms_per_example"] = 1000 * seconds / max(examples, 1)
        summary[method] = row
    return summary


def markdown_table(summary: dict[str, dict[str, float]]) -> str:
    """The summary as a markdown table, one row per method.

    Example:
        >>> print(markdown_table({"Rollout": {"positive_auc": 31.25, "ms_per_example": 2.0}}))
        | method | pos. AUC ↓ | ms / example |
        |---|---:|---:|
        | Rollout | 31.2 | 2.0 |
    """
    present = {key for row in summary.values() for key in row}
    columns = [c for c in COLUMNS if c[0] in present]
    lines = [
        "| method | " + " | ".join(title for _, title, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for method, row in summary.items():
        cells = [f"{row[key] * scale:.1f}" if key in row else "" for key, _, scale in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def accuracy(results: JobResults) -> tuple[int, int] | None:
    """``(correct, examples)`` of the model's predictions against the data's labels, or None
    when the data has no labels."""
    labels, predicted = results.column("label"), results.column("predicted")
    if labels is None or predicted is None:
        return None
    return int((labels == predicted).sum()), len(labels)


def write_report(results: JobResults, summary: dict[str, dict[str, float]], folder: Path) -> None:
    """Write ``report.md``, ``report.png`` (mean curves) and ``summary.json`` into ``folder``."""
    write_json(folder / "summary.json", summary)
    picture = _plot_curves(results)
    if picture is not None:
        write_atomic(folder / "report.png", picture)
    text = _markdown(results, summary, picture is not None)
    write_atomic(folder / "report.md", text.encode())


def _markdown(results: JobResults, summary: dict[str, dict[str, float]], has_plot: bool) -> str:
    index = results.index
    data, model, settings = index["data"], index["model"], index["settings"]
    methods = ", ".join(
        f"`{m['name']}` ({m['attribution']}"
        + (f", {json.dumps(m['options'])})" if m["options"] else ")")
        for m in index["methods"]
    )
    text_rows = data["kind"] == "text"
    lines = [
        "# Attribution job report",
        "",
        f"Model `{model['name']}` ({model['parameters']:,} parameters, sha256 "
        f"`{model['sha256'][:12]}`), {data['examples']} {data['kind']} examples from "
        f"{data['source']}, captum_chefer {index['package']['version']}, torch "
        f"{index['package']['torch']}, {index.get('threads')} thread(s) per rank. Seed "
        f"{settings['seed']}: a rerun gives the same scores (timings vary).",
        "",
        explained(settings["target"], index.get("classes")),
        "",
        predictions(results, index.get("classes")),
        "",
        f"Methods: {methods}.",
        "",
        markdown_table(summary),
        "",
        "Perturbation AUC (Chefer et al., CVPR 2021): top-1 accuracy on the explained class while "
        "0-90 % of the " + ("tokens" if text_rows else "pixels") + " are removed, most relevant "
        "first (pos.) or least relevant first (neg.), x 100. Deletion/insertion (RISE): area under "
        "the probability as features are removed / inserted, x 100. ms / example: the method's "
        "attribution time alone (the metrics' forwards excluded), on this run's machine and load.",
    ]
    if text_rows:
        lines.append(
            "ERASER comprehensiveness/sufficiency (%): probability drop when the top 1-50 % of "
            "the real tokens are removed / kept. Removed tokens become the [MASK] id; "
            "[CLS]/[SEP]/padding are never touched."
        )
    if has_plot:
        lines += ["", "![mean curves](report.png)"]
    return "\n".join(lines) + "\n"


def explained(target: str, classes: list[str] | None) -> str:
    """Which class each example's explanation is for, in words.

    Example:
        >>> explained("predicted", ["negative", "positive"])[:60]
        'Explained class (target): the class the model predicts for e'
    """
    named = (
        " Classes: " + ", ".join(f"{i} {name}" for i, name in enumerate(classes)) + "."
        if classes
        else ""
    )
    if target == "label":
        return (
            "Explained class (target): each example's label (`--target label`), whatever "
            f"the model predicts.{named}"
        )
    return (
        "Explained class (target): the class the model predicts for each example (its "
        f"argmax, `--target predicted`), right or wrong.{named}"
    )


def predictions(results: JobResults, classes: list[str] | None) -> str:
    """The model's accuracy against the data's labels and its predicted classes, in words."""
    predicted = results.column("predicted")
    counts = "" if predicted is None else _counts(predicted, classes)
    scored = accuracy(results)
    if scored is None:
        return f"The data has no labels, so the model's accuracy is unknown.{counts}"
    correct, total = scored
    return (
        f"Accuracy against the data's labels: {correct} of {total} predicted right "
        f"({100 * correct / total:.1f} %).{counts}"
    )


def _counts(predicted: torch.Tensor, classes: list[str] | None) -> str:
    values = torch.bincount(predicted.long()).tolist()
    named = [
        f"{classes[c] if classes and c < len(classes) else c} ({n})"
        for c, n in enumerate(values)
        if n
    ]
    return " Predicted classes (examples): " + ", ".join(named) + "."


def _plot_curves(results: JobResults) -> bytes | None:
    """The mean curves as PNG bytes (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    curves = results.table("curve")
    examples = len(results)
    figure, axes = plt.subplots(1, 4, figsize=(17, 4.3), layout="constrained")
    for axis, (name, (title, fractions, ylabel)) in zip(axes, CURVE_TITLES.items()):
        for method in results.methods:
            mean = curves[method][name].double().mean(0)
            axis.plot([100 * f for f in fractions], mean.tolist(), marker=".", label=method)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("% of features changed", fontsize=8)
        axis.set_ylabel(ylabel, fontsize=8)
        axis.grid(alpha=0.3)
        axis.ticklabel_format(axis="y", useOffset=False)
    axes[0].legend(fontsize=7)
    kind = "tokens" if results.index["data"]["kind"] == "text" else "pixels"
    figure.suptitle(
        f"Mean curves over {examples} examples ({kind} changed in relevance order): "
        "↑ higher is better, ↓ lower is better",
        fontsize=10,
    )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()
