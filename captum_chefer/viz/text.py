"""Token relevance as coloured text: an HTML fragment, a standalone HTML page, a matplotlib figure.

Positive relevance is drawn in red, negative in blue, and the colour's opacity is proportional
to ``|score| / scale``: relevance that is never negative (Chefer's) reads on a sequential scale
from white at 0 to red. The scale is stated in every picture: by default a page of several
sentences shares one scale (:func:`save_text_heatmap`, with one scale bar for the page), so that
a weakly explained sentence looks weak; a single sentence uses its own largest ``|score|``. The
HTML and the matplotlib pictures use the same colours, and :func:`add_colour_bar` labels a
figure's scale.

Captum's ``visualize_text`` needs IPython; these helpers write files that open anywhere. Only
torch is imported here; matplotlib is imported inside :func:`plot_text_heatmap`.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

POSITIVE_RGB = (220, 38, 38)
NEGATIVE_RGB = (37, 99, 235)
MAX_ALPHA = 0.85
"""Opacity of the token with the largest ``|score|``; below 1 so that dark text stays legible."""


def token_colours(scores: Tensor, scale: float | None = None) -> list[tuple[int, int, int, float]]:
    """The ``(r, g, b, alpha)`` of each token, ``alpha`` proportional to ``|score| / scale``.

    Args:
        scores: relevance ``(T,)``, one value per token, finite.
        scale: the ``|score|`` drawn at full colour (larger values are capped); None: the
            largest ``|score|`` of ``scores``.

    Example:
        >>> token_colours(torch.tensor([0.0, 0.5, -1.0]))
        [(220, 38, 38, 0.0), (220, 38, 38, 0.425), (37, 99, 235, 0.85)]
        >>> token_colours(torch.tensor([0.5]), scale=2.0)
        [(220, 38, 38, 0.212)]
    """
    values = _as_scores(scores)
    scale = _scale(values, scale)
    colours = []
    for value in values:
        alpha = round(MAX_ALPHA * min(abs(value) / scale, 1.0), 3) if scale > 0 else 0.0
        colours.append((*(NEGATIVE_RGB if value < 0 else POSITIVE_RGB), alpha))
    return colours


def text_heatmap_html(
    tokens: Sequence[str],
    scores: Tensor,
    title: str | None = None,
    scale: float | None = None,
    legend: bool = True,
) -> str:
    """One sentence as an HTML fragment: tokens on backgrounds coloured by relevance, a legend.

    Tokens and title are HTML-escaped; each token's raw score is its hover tooltip.

    Args:
        tokens: the ``T`` tokens, as they should be shown.
        scores: relevance ``(T,)`` of those tokens (e.g. one row of ``CheferRelevance`` output,
            cut to the real tokens).
        title: a heading shown above the tokens.
        scale: the ``|score|`` drawn at full colour, stated in the legend; None: the
            sentence's own largest ``|score|``.
        legend: add the scale bar under the tokens (a page of rows on one scale shows one bar
            for all of them instead); a row whose every score is 0 says so either way.

    Returns:
        A ``<div>`` that can be placed in any HTML page (see :func:`save_text_heatmap`).

    Example:
        >>> import torch
        >>> fragment = text_heatmap_html(["a", "<b>", "cat"], torch.tensor([0.1, 0.5, 1.0]))
        >>> "&lt;b&gt;" in fragment and "<b>" not in fragment
        True
        >>> span = fragment.splitlines()[3]
        >>> span[span.index("rgba"):]
        'rgba(220, 38, 38, 0.425)" title="0.5">&lt;b&gt;</span>'
    """
    values = _as_scores(scores)
    _check_lengths(tokens, values)
    lines = ['<div class="cc-heatmap">']
    if title is not None:
        lines.append(f'<div class="cc-title">{html.escape(title)}</div>')
    lines.append('<div class="cc-tokens">')
    for token, value, colour in zip(tokens, values, token_colours(scores, scale), strict=True):
        lines.append(
            f'<span class="cc-token" style="background-color: {_css(colour)}" '
            f'title="{value:.4g}">{html.escape(token)}</span>'
        )
    shown = legend or not any(values)  # a row of zeros says so even under a page's bar
    lines += ["</div>", _legend_html(values, scale) if shown else "", "</div>"]
    return "\n".join(lines)


def save_text_heatmap(
    path: str | os.PathLike[str],
    rows: Sequence[tuple[str, Sequence[str], Tensor]],
    page_title: str = "Token relevance",
    scale: Literal["shared", "row"] | float = "shared",
    intro: str | None = None,
) -> str:
    """Write one standalone HTML page with several sentences.

    Args:
        path: the ``.html`` file to write; its folder must exist.
        rows: ``(title, tokens, scores)`` for each sentence, as for :func:`text_heatmap_html`.
        page_title: the page's ``<title>`` and top heading.
        scale: ``"shared"`` (default): one full-colour value, the largest ``|score|`` of all
            rows, so that rows compare, with one scale bar under the ``intro``; ``"row"``:
            each row its own, with a bar under each row; or a number (one bar).
        intro: a paragraph under the heading that says what the colours show.

    Returns:
        ``path``, as a string.
    """
    shared = None
    if scale == "shared":
        shared = max((_scale(_as_scores(scores), None) for _, _, scores in rows), default=0.0)
    elif scale != "row":
        shared = float(scale)
    fragments = "\n".join(
        text_heatmap_html(tokens, scores, title, shared, legend=shared is None)
        for title, tokens, scores in rows
    )
    heading = html.escape(page_title)
    paragraph = f"<p>{html.escape(intro)}</p>\n" if intro else ""
    if shared is not None:
        every = [value for _, _, scores in rows for value in _as_scores(scores)]
        paragraph += _legend_html(every, shared) + "\n"
    page = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{heading}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{heading}</h1>\n{paragraph}{fragments}\n</body>\n</html>\n"
    )
    with open(path, "w", encoding="utf-8") as file:
        file.write(page)
    return os.fspath(path)


def plot_text_heatmap(
    tokens: Sequence[str], scores: Tensor, ax: Any = None, scale: float | None = None
) -> Any:
    """Draw one sentence as coloured tokens on a matplotlib axes, wrapping at its right edge.

    Args:
        tokens: the ``T`` tokens.
        scores: relevance ``(T,)``.
        ax: the axes to draw on; a new figure is made when None.
        scale: the ``|score|`` drawn at full colour; None: the sentence's largest ``|score|``.
            Label it with :func:`add_colour_bar`.

    Returns:
        The matplotlib ``Figure`` (save it with ``fig.savefig("relevance.png")``).
    """
    import matplotlib.pyplot as plt
    from matplotlib.transforms import ScaledTranslation

    values = _as_scores(scores)
    _check_lengths(tokens, values)
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.8))
    figure = ax.figure
    ax.set_axis_off()
    renderer = figure.canvas.get_renderer()
    width = ax.get_window_extent(renderer).width / figure.dpi
    line_height = 1.9 * _FONT_SIZE / 72
    x, line = 0.0, 0
    for token, colour in zip(tokens, token_colours(scores, scale), strict=True):
        text = ax.text(
            0.0,
            0.75,
            token,
            transform=ax.transAxes,
            va="center",
            ha="left",
            fontsize=_FONT_SIZE,
            bbox={
                "boxstyle": "round,pad=0.2",
                "linewidth": 0,
                "facecolor": (*(c / 255 for c in colour[:3]), colour[3]),
            },
        )
        token_width = text.get_window_extent(renderer).width / figure.dpi
        if x + token_width > width and x > 0.0:
            x, line = 0.0, line + 1
        # Offsets in inches from the axes' corner, so that a later tight_layout keeps the spacing.
        offset = ScaledTranslation(x, -line * line_height, figure.dpi_scale_trans)
        text.set_transform(ax.transAxes + offset)
        x += token_width + _TOKEN_GAP
    return figure


def add_colour_bar(
    figure: Any, axes: Any, scale: float, label: str = "relevance", signed: bool = False
) -> Any:
    """The key of :func:`plot_text_heatmap`: a colour bar from 0 (white) to ``scale`` (red).

    The colours are those of :func:`token_colours` over white. Relevance that is never
    negative (Chefer's, rollout's) needs no more; ``signed=True`` draws the bar from
    ``-scale`` (blue) through white to ``+scale`` for relevance of either sign.

    Args:
        figure: the matplotlib ``Figure``.
        axes: the axes (or a list of them) to put the bar beside.
        scale: the ``|score|`` at full colour.
        label: the bar's label; the scale is stated by the bar's end ticks.
        signed: draw the negative half too.

    Returns:
        The matplotlib ``Colorbar``.

    Example:
        >>> from matplotlib.figure import Figure
        >>> figure = Figure()
        >>> ax = figure.subplots()
        >>> bar = add_colour_bar(figure, ax, 2e-4)
        >>> [round(float(t), 6) for t in bar.get_ticks()]
        [0.0, 0.0001, 0.0002]
        >>> bar = add_colour_bar(figure, ax, 2e-4, signed=True)
        >>> [round(float(t), 6) for t in bar.get_ticks()]
        [-0.0002, 0.0, 0.0002]
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LinearSegmentedColormap, Normalize

    if not scale > 0:
        raise ValueError(f"scale must be positive, not {scale}; every score may be 0.")
    ends = [(1.0, 1.0, 1.0), _over_white(POSITIVE_RGB)]
    ticks = [0.0, scale / 2, scale]
    if signed:
        ends.insert(0, _over_white(NEGATIVE_RGB))
        ticks = [-scale, 0.0, scale]
    cmap = LinearSegmentedColormap.from_list("captum_chefer", ends)
    mappable = ScalarMappable(Normalize(ticks[0], scale), cmap)
    bar = figure.colorbar(mappable, ax=axes, fraction=0.03, pad=0.01)
    bar.set_ticks(ticks)
    bar.set_ticklabels([f"{tick:.2g}" if tick else "0" for tick in ticks])
    bar.set_label(label)
    return bar


def _over_white(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    r, g, b = (MAX_ALPHA * c / 255 + (1 - MAX_ALPHA) for c in rgb)
    return (r, g, b)


def _scale(values: list[float], scale: float | None) -> float:
    if scale is None:
        return max((abs(v) for v in values), default=0.0)
    if not scale > 0:
        raise ValueError(f"scale must be a positive number, not {scale}.")
    return float(scale)


_FONT_SIZE = 11
_TOKEN_GAP = 0.1
"""Inches between tokens; the coloured boxes are padded by 0.2 font sizes on each side."""

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:60em}"
    ".cc-heatmap{margin:0 0 1.5em 0}"
    ".cc-title{font-weight:600;margin-bottom:.3em}"
    ".cc-tokens{line-height:2.1em;font-size:1.1em}"
    ".cc-token{padding:.15em .25em;margin-right:.2em;border-radius:.25em;color:#111}"
    ".cc-legend{font-size:.8em;color:#555;margin-top:.2em}"
    ".cc-bar{display:inline-block;width:8em;height:.8em;vertical-align:middle;margin:0 .4em}"
)


def _legend_html(values: list[float], shared: float | None) -> str:
    scale = _scale(values, shared)
    if max((abs(v) for v in values), default=0.0) == 0.0:
        return '<div class="cc-legend">every score is 0</div>'
    whose = "this sentence's largest" if shared is None else "one scale for every sentence"
    positive = _css((*POSITIVE_RGB, MAX_ALPHA))
    negative = _css((*NEGATIVE_RGB, MAX_ALPHA))
    gradient = f"linear-gradient(to right, {negative}, rgba(255, 255, 255, 0), {positive})"
    low = f"{-scale:.3g}"
    if min(values) >= 0:  # never negative: a sequential scale from 0
        gradient = f"linear-gradient(to right, rgba(255, 255, 255, 0), {positive})"
        low = "0"
    return (
        f'<div class="cc-legend">{low}<span class="cc-bar" style="background: {gradient}">'
        f"</span>{scale:.3g} (relevance; full colour at |value| = {scale:.3g}, {whose})</div>"
    )


def _css(colour: tuple[int, int, int, float]) -> str:
    return f"rgba({colour[0]}, {colour[1]}, {colour[2]}, {colour[3]})"


def _as_scores(scores: Tensor) -> list[float]:
    values = torch.as_tensor(scores).detach().to("cpu", torch.float64)
    if values.dim() != 1:
        raise ValueError(
            f"scores must be one value per token, shape (T,), not {tuple(values.shape)}; pass "
            "one row of the relevance, e.g. relevance[i, :length]."
        )
    listed = values.tolist()
    if not all(math.isfinite(v) for v in listed):
        raise ValueError("scores contain NaN or infinity; there is nothing sensible to colour.")
    return listed


def _check_lengths(tokens: Sequence[str], values: list[float]) -> None:
    if len(tokens) != len(values):
        raise ValueError(
            f"{len(tokens)} tokens but {len(values)} scores; cut the relevance row to the real "
            "tokens (drop padding), e.g. relevance[i, : int(attention_mask[i].sum())]."
        )
