"""Metric curves as a figure: perturbation, deletion and insertion, one line per method.

:func:`captum_chefer.metrics.perturbation_curve` and its kin return a bare ``(B, S)`` tensor.
:func:`plot_metric_curves` draws the mean over examples of each method's curve against the
fraction of features removed (or inserted), with a band of one standard error, and puts each
curve's area (the paper's AUC) in the legend; ``better`` puts ↓ or ↑ on the axis and the
legend, so that the reader knows which way is good. matplotlib is imported inside the function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor


def plot_metric_curves(
    curves: Mapping[str, Tensor],
    fractions: Sequence[float] | Tensor,
    *,
    area: Callable[[Tensor, Sequence[float] | Tensor], Tensor] | None = None,
    ax: Any = None,
    title: str | None = None,
    xlabel: str = "fraction of features removed",
    ylabel: str = "score of the target",
    better: Literal["lower", "higher"] | None = None,
) -> Any:
    """One line per method: the mean curve over examples, a standard-error band, its area.

    Args:
        curves: method name → ``(B, S)`` curve (or ``(S,)``), e.g. from
            :func:`~captum_chefer.metrics.perturbation_curve`.
        fractions: the ``S`` fractions the curves were measured at (the x axis).
        area: the area function for the legend, e.g.
            :func:`~captum_chefer.metrics.perturbation_auc`; None: no areas.
        ax: the axes to draw on; a new figure is made when None.
        title: the axes' title.
        xlabel: the x axis label.
        ylabel: the y axis label (say which score: probability, accuracy, logit).
        better: whether a ``"lower"`` curve (and area) is better, as when the most relevant
            features are removed first, or a ``"higher"`` one; marked ↓ or ↑ on the y axis and
            the legend's title.

    Returns:
        The matplotlib ``Figure``.

    Example:
        >>> from captum_chefer.metrics import perturbation_auc
        >>> curves = {"A": torch.tensor([[1.0, 0.5, 0.0]]), "B": torch.tensor([1.0, 1.0, 0.5])}
        >>> figure = plot_metric_curves(curves, (0.0, 0.25, 0.5), area=perturbation_auc)
        >>> [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
        ['A (area 25.0)', 'B (area 43.8)']
        >>> figure = plot_metric_curves(
        ...     curves, (0.0, 0.25, 0.5), area=perturbation_auc, better="lower"
        ... )
        >>> figure.axes[0].get_ylabel(), figure.axes[0].get_legend().get_title().get_text()
        ('score of the target (↓ better)', 'area (↓ lower is better)')
    """
    import matplotlib.pyplot as plt

    x = torch.as_tensor(fractions, dtype=torch.float64)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    for name, curve in curves.items():
        rows = _rows(curve, len(x), name)
        _draw(ax, x, rows, _label(name, rows, x, area))
    if better not in (None, "lower", "higher"):
        raise ValueError(f"better must be 'lower', 'higher' or None, not {better!r}.")
    arrow = {"lower": "↓", "higher": "↑"}.get(better or "")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{ylabel} ({arrow} better)" if arrow else ylabel)
    ax.set_xlim(float(x[0]), float(x[-1]))
    ax.grid(alpha=0.3)
    heading = f"area ({arrow} {better} is better)" if arrow and area is not None else None
    ax.legend(fontsize=8, frameon=False, title=heading, title_fontsize=8)
    if title is not None:
        ax.set_title(title, fontsize=10)
    return ax.figure


def _rows(curve: Tensor, steps: int, name: str) -> Tensor:
    rows = torch.as_tensor(curve).detach().to("cpu", torch.float64)
    rows = rows[None] if rows.dim() == 1 else rows
    if rows.dim() != 2 or rows.shape[1] != steps:
        raise ValueError(
            f"curve {name!r} has shape {tuple(torch.as_tensor(curve).shape)}; expected (B, {steps})"
            " or (S,), one value per fraction. Pass the fractions the curve was measured at."
        )
    return rows


def _label(name: str, rows: Tensor, x: Tensor, area: Callable[..., Tensor] | None) -> str:
    if area is None:
        return name
    return f"{name} (area {float(area(rows, x).mean()):.1f})"


def _draw(ax: Any, x: Tensor, rows: Tensor, label: str) -> None:
    mean = rows.mean(0)
    (line,) = ax.plot(x.numpy(), mean.numpy(), marker="o", markersize=3, label=label)
    if len(rows) > 1:
        error = rows.std(0) / len(rows) ** 0.5
        low, high = (mean - error).numpy(), (mean + error).numpy()
        ax.fill_between(x.numpy(), low, high, color=line.get_color(), alpha=0.2, linewidth=0)
