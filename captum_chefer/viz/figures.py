"""What every figure says about itself: a title, one line on how to read it, one colour bar.

:func:`label_figure` puts a title and a "how to read this" line above a figure (and, for a
model that was not trained, a red warning), outside the axes so that no layout moves.
:func:`colour_bar` adds one labelled bar for all panels of a figure, from 0 for relevance that
is never negative. :func:`from_zero` puts a Captum heat map that holds no negative value
(``LLMAttributionResult.plot_token_attr``) on a sequential scale from 0.
:func:`plot_image_maps` draws images and their relevance maps with Captum's
``visualize_image_attr``, labelled this way. matplotlib is imported inside the functions.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

UNTRAINED = "untrained model: the maps are not meaningful"
"""The warning a figure of an untrained (random or barely trained) model carries."""

_TITLE_SIZE = 11
_TEXT_SIZE = 8.5
_POINTS_PER_CHARACTER = 0.5 * _TEXT_SIZE


def label_figure(
    figure: Any, title: str, how_to_read: str, *, warning: str | None = None
) -> list[Any]:
    """Write ``title`` and ``how_to_read`` (and a red ``warning``) above the figure's content.

    The texts sit above the top edge of the figure, so they never cover a panel; save with
    ``bbox_inches="tight"`` (or display in a notebook) to include them. ``how_to_read`` wraps to
    the figure's width.

    Args:
        figure: the matplotlib ``Figure``.
        title: what the figure shows, one line.
        how_to_read: what colour, position or outline mean, in a sentence or two.
        warning: a line in red above the title, e.g. :data:`UNTRAINED`.

    Returns:
        The matplotlib ``Text`` objects, bottom first.

    Example:
        >>> from matplotlib.figure import Figure
        >>> figure = Figure(figsize=(4, 2))
        >>> texts = label_figure(figure, "Relevance", "Darker is more relevant.", warning=UNTRAINED)
        >>> [text.get_text() for text in texts]
        ['Darker is more relevant.', 'Relevance', 'untrained model: the maps are not meaningful']
    """
    from matplotlib.transforms import offset_copy

    width = figure.get_figwidth() * 72 / _POINTS_PER_CHARACTER
    lines = textwrap.wrap(how_to_read, max(int(width), 40))
    blocks = [("\n".join(lines), _TEXT_SIZE, "normal", "0.25", len(lines))]
    blocks.append((title, _TITLE_SIZE, "bold", "black", 1))
    if warning:
        blocks.append((warning, _TEXT_SIZE + 1, "bold", "#b91c1c", 1))
    texts, offset = [], 6.0
    for text, size, weight, colour, count in blocks:
        transform = offset_copy(figure.transFigure, fig=figure, y=offset, units="points")
        texts.append(
            figure.text(
                0.0,
                1.0,
                text,
                transform=transform,
                fontsize=size,
                fontweight=weight,
                color=colour,
                ha="left",
                va="bottom",
                linespacing=1.3,
            )
        )
        offset += count * size * 1.3 + 4
    return texts


def colour_bar(
    figure: Any,
    axes: Any,
    label: str,
    *,
    cmap: str = "Reds",
    vmax: float = 1.0,
    signed: bool = False,
) -> Any:
    """One labelled colour bar for ``axes`` (a list: every panel of the figure).

    Args:
        figure: the matplotlib ``Figure``.
        axes: the axes the bar serves; it is placed beside them.
        label: what the colour measures, with its unit (e.g. "relevance ÷ the map's maximum").
        cmap: a matplotlib colour map; sequential for relevance that is never negative.
        vmax: the value at full colour.
        signed: the bar runs from ``-vmax`` to ``vmax`` (a diverging ``cmap``) instead of from 0.

    Example:
        >>> from matplotlib.figure import Figure
        >>> figure = Figure()
        >>> bar = colour_bar(figure, figure.subplots(1, 2).tolist(), "relevance")
        >>> bar.mappable.get_clim(), bar.ax.get_ylabel()
        ((0.0, 1.0), 'relevance')
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mappable = ScalarMappable(Normalize(-vmax if signed else 0.0, vmax), cmap)
    bar = figure.colorbar(mappable, ax=axes, fraction=0.025, pad=0.02)
    bar.set_label(label)
    return bar


def from_zero(figure: Any, label: str, cmap: str = "Greens") -> None:
    """Put every heat map of ``figure`` that has no negative value on a scale from 0.

    Captum's ``LLMAttributionResult.plot_token_attr`` centres its red-white-green scale on 0,
    so a map that is never negative (Chefer's) uses only half of it. This sets each such image
    to ``cmap`` from 0 to its maximum; its colour bar follows, and is relabelled ``label``.

    Example:
        >>> from matplotlib.figure import Figure
        >>> figure = Figure()
        >>> ax = figure.subplots()
        >>> image = ax.imshow([[0.0, 2.0]], cmap="RdYlGn", vmin=-2, vmax=2)
        >>> bar = figure.colorbar(image)
        >>> from_zero(figure, "relevance")
        >>> image.get_clim(), bar.ax.get_ylabel()
        ((0.0, 2.0), 'relevance')
    """
    for ax in figure.axes:
        for image in ax.get_images():
            values = image.get_array()
            if values is None or float(values.min()) < 0:
                continue
            image.set_cmap(cmap)
            image.set_clim(0.0, max(float(values.max()), 1e-12))
            bar = image.colorbar
            if bar is not None:  # Captum's style: read top to bottom, right of the ticks
                bar.ax.set_ylabel(label, rotation=270, va="bottom")


def plot_image_maps(
    images: Tensor,
    maps: Mapping[str, Tensor],
    *,
    labels: Sequence[str] | None = None,
    masks: Tensor | None = None,
    title: str = "Relevance of each pixel",
    how_to_read: str | None = None,
    warning: str | None = None,
    cmap: str = "inferno",
) -> Any:
    """Each image beside its relevance maps, blended over it by Captum's
    ``visualize_image_attr``, with one colour bar, a title and a line on how to read it.

    Each map is divided by its own largest value (stated in its panel title), so every panel
    uses the whole colour bar; only the positive part of a signed map is drawn.

    Args:
        images: ``(B, 3, H, W)`` in ``[0, 1]`` (undo the model's normalisation first).
        maps: method name → ``(B, H, W)``, ``(B, 1, H, W)`` or ``(B, N)`` patch relevance.
        labels: one caption per image (e.g. ``"true cat, predicted cat"``).
        masks: ``(B, H, W)`` ground truth, outlined in cyan on every map.
        title: the figure's title.
        how_to_read: the line under it; a default explains the colours (and the outline).
        warning: a red line above the title, e.g. :data:`UNTRAINED`.
        cmap: the colour map of the maps.

    Returns:
        A pyplot ``Figure``, like the other plots of this package (a notebook shows it):
        ``figure.savefig(path, bbox_inches="tight")``, then ``plt.close(figure)``.

    Example:
        >>> import matplotlib.pyplot as plt
        >>> figure = plot_image_maps(torch.rand(1, 3, 16, 16), {"Chefer": torch.rand(1, 16)})
        >>> len(figure.axes)  # the image, one map, the colour bar
        3
        >>> plt.close(figure)
    """
    import matplotlib.pyplot as plt
    from captum.attr import visualization as viz

    from .records import image_attr_arguments

    count = len(images)
    figure = plt.figure(figsize=(2.6 * (len(maps) + 1) + 0.6, 2.6 * count))
    axes = figure.subplots(count, len(maps) + 1, squeeze=False)
    top = 1 - 0.3 / figure.get_figheight()  # room for the first row's captions only
    figure.subplots_adjust(left=0.02, right=0.9, top=top, bottom=0.02, wspace=0.08, hspace=0.2)
    for row in range(count):
        _show_image(axes[row, 0], images[row], labels[row] if labels else f"image {row}")
        for column, (name, values) in enumerate(maps.items(), start=1):
            arguments = image_attr_arguments(_one_map(values[row]), images[row], title=name)
            arguments.update(show_colorbar=False, cmap=cmap, alpha_overlay=0.7)
            viz.visualize_image_attr(
                **arguments, plt_fig_axis=(figure, axes[row, column]), use_pyplot=False
            )
            axes[row, column].title.set_fontsize(8)
            if masks is not None:
                axes[row, column].contour(masks[row].float().cpu().numpy(), [0.5], colors="cyan")
    colour_bar(figure, axes.ravel().tolist(), "relevance ÷ the map's max (in its title)", cmap=cmap)
    default = "Brighter = more relevant (positive part, each map scaled to its own maximum)."
    if masks is not None:
        default += " Cyan outline: the true object (ground-truth mask)."
    label_figure(figure, title, how_to_read or default, warning=warning)
    return figure


def _one_map(values: Tensor) -> Tensor:
    values = values.detach().to("cpu", torch.float64)
    return values.sum(0) if values.dim() == 3 and values.shape[0] > 1 else values


def _show_image(ax: Any, image: Tensor, caption: str) -> None:
    ax.imshow(image.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_title(caption, fontsize=8)
    ax.set_axis_off()
