"""The job's report: one row per method of merged scores, and the mean curves as a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
CURVE_TITLES = {
    "positive": ("positive perturbation (most relevant first)", CHEFER_FRACTIONS, "top-1 accuracy"),
    "negative": (
        "negative perturbation (least relevant first)",
        CHEFER_FRACTIONS,
        "top-1 accuracy",
    ),
    "deletion": ("deletion (RISE)", RISE_FRACTIONS, "probability"),
    "insertion": ("insertion (RISE)", RISE_FRACTIONS, "probability"),
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


def write_report(results: JobResults, summary: dict[str, dict[str, float]], folder: Path) -> None:
    """Write ``report.md``, ``report.png`` (mean curves) and ``summary.json`` into ``folder``."""
    index = results.index
    write_json(folder / "summary.json", summary)
    has_plot = _plot_curves(results, folder / "report.png")
    text = _markdown(index, summary, has_plot)
    write_atomic(folder / "report.md", text.encode())


def _markdown(index: dict[str, Any], summary: dict[str, dict[str, float]], has_plot: bool) -> str:
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
        f"{index['package']['torch']}, {index.get('threads')} thread(s) per rank. Explained "
        f"class: {settings['target']}. Seed {settings['seed']}: a rerun gives the same scores "
        "(timings vary).",
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


def _plot_curves(results: JobResults, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    curves = results.table("curve")
    figure, axes = plt.subplots(1, 4, figsize=(17, 3.8), layout="constrained")
    for axis, (name, (title, fractions, ylabel)) in zip(axes, CURVE_TITLES.items()):
        for method in results.methods:
            mean = curves[method][name].double().mean(0)
            axis.plot([100 * f for f in fractions], mean.tolist(), marker=".", label=method)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("% of features changed", fontsize=8)
        axis.set_ylabel(ylabel, fontsize=8)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True
