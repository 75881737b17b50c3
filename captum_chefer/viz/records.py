"""Our relevance in Captum's own pictures: ``visualize_text`` and ``visualize_image_attr``.

Captum colours a word by its raw value clipped to ``[-1, 1]``, so Chefer's relevance of about
1e-4 renders white, with a score of 0.00. :func:`visualization_records` first normalises each
row to a stated scale (see :mod:`captum_chefer.viz.tokens`), masks the special tokens, merges
word pieces on request, and writes the scale into the row's label. :func:`records_html` renders
the same table without IPython; :func:`visualize_text` displays it in a notebook. Its legend
names the colours by the sign of the relevance ("for" / "against" the explained output), never
"positive" / "negative", which a reader would take for class names beside sentiment labels.
:func:`image_attr_arguments` turns a patch or pixel map into the arguments of Captum's
``visualize_image_attr``.

Captum is imported inside the functions, so that ``captum_chefer.viz`` loads with torch only.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .tokens import Scale, row_scales, token_rows

NOTEBOOK_EXTRA = 'pip install "captum_chefer[notebook]"  (or: pip install ipython)'


def visualization_records(
    relevance: Tensor,
    tokens: Sequence[Sequence[str]],
    *,
    special_mask: Tensor | None = None,
    merge_word_pieces: bool = False,
    scale: Scale = "shared",
    attr_class: str = "Chefer",
    pred_class: Sequence[Any] | None = None,
    pred_prob: Sequence[float] | None = None,
    true_class: Sequence[Any] | None = None,
) -> list[Any]:
    """One Captum ``VisualizationDataRecord`` per example, on a stated scale.

    Each row's ``word_attributions`` is its relevance divided by the scale (so in ``[-1, 1]``)
    with special tokens set to 0; ``attr_class`` becomes ``"<attr_class> (full colour at
    <scale>)"``, so the table says what full colour means; ``attr_score`` is the raw sum over
    coloured tokens.

    Args:
        relevance: ``(B, T)`` token relevance.
        tokens: ``B`` lists of the real tokens (no padding), as for
            :func:`~captum_chefer.viz.tokens.token_rows`.
        special_mask: ``(B, T)`` bool, True at tokens left uncoloured ([CLS], [SEP]).
        merge_word_pieces: join ``##`` pieces into words, summing their relevance.
        scale: ``"shared"`` (default: one scale, so rows compare), ``"row"``, or a number.
        attr_class: the method's name, shown in Captum's "Attribution Label" column.
        pred_class: ``B`` predicted labels (default: empty).
        pred_prob: ``B`` probabilities or scores of the prediction (default: NaN).
        true_class: ``B`` true labels (default: empty).

    Returns:
        Records for ``captum.attr.visualization.visualize_text`` or :func:`records_html`.

    Example:
        >>> relevance = torch.tensor([[0.0, 1e-4, 4e-4, 0.0], [0.0, 2e-4, 0.0, 0.0]])
        >>> tokens = [["[CLS]", "a", "cat", "[SEP]"], ["[CLS]", "dog", "[SEP]"]]
        >>> special = torch.tensor([[1, 0, 0, 1], [1, 0, 1, 0]], dtype=torch.bool)
        >>> records = visualization_records(relevance, tokens, special_mask=special)
        >>> [round(v, 3) for v in records[0].word_attributions.tolist()]
        [0.0, 0.25, 1.0, 0.0]
        >>> records[1].word_attributions.tolist(), records[1].attr_class
        ([0.0, 0.5, 0.0], 'Chefer (full colour at 0.0004)')
    """
    from captum.attr import visualization as viz

    rows = token_rows(
        relevance, tokens, special_mask=special_mask, merge_word_pieces=merge_word_pieces
    )
    scales = row_scales(rows, scale)
    count = len(rows)
    pred_class = _per_row(pred_class, count, "", "pred_class")
    pred_prob = _per_row(pred_prob, count, float("nan"), "pred_prob")
    true_class = _per_row(true_class, count, "", "true_class")
    records = []
    for i, (row, value) in enumerate(zip(rows, scales, strict=True)):
        shown = row.shown()
        records.append(
            viz.VisualizationDataRecord(
                shown / value,
                float(pred_prob[i]),
                pred_class[i],
                true_class[i],
                f"{attr_class} (full colour at {value:.2g})",
                float(shown.sum()),
                row.tokens,
                None,
            )  # fmt: skip
        )
    return records


def _per_row(values: Sequence[Any] | None, count: int, default: Any, name: str) -> list[Any]:
    if values is None:
        return [default] * count
    listed = list(values)
    if len(listed) != count:
        raise ValueError(f"{name} has {len(listed)} entries; give one per example ({count}).")
    return listed


def records_html(records: Sequence[Any], legend: bool = True, title: str | None = None) -> str:
    """The table of Captum's ``visualize_text`` as an HTML string; needs no IPython.

    It is built from Captum's public formatting functions, so its colours are Captum's. The
    legend names what a colour means for the relevance: green counts for the explained output
    (the class in "Predicted Label", or the score), red against it; full colour is the value in
    each row's "Attribution Label". ``title`` (escaped) heads the table.

    Example:
        >>> records = visualization_records(torch.tensor([[1e-4, 2e-4]]), [["a", "cat"]])
        >>> page = records_html(records)
        >>> page.count("<mark"), "hsl(120, 75%, 50%)" in page
        (2, True)
    """
    from captum.attr import visualization as viz

    header = (
        "<tr><th>True Label</th><th>Predicted Label</th><th>Attribution Label</th>"
        "<th>Attribution Score</th><th>Word Importance</th></tr>"
    )
    rows = [
        "<tr>"
        + viz.format_classname(record.true_class)
        + viz.format_classname(f"{record.pred_class} ({record.pred_prob:.2f})")
        + viz.format_classname(record.attr_class)
        + viz.format_classname(f"{record.attr_score:.3g}")
        + viz.format_word_importances(record.raw_input_ids, record.word_attributions)
        + "</tr>"
        for record in records
    ]
    heading = f"<h3>{html.escape(title)}</h3>" if title else ""
    return heading + (LEGEND if legend else "") + "<table>" + header + "".join(rows) + "</table>"


def visualize_text(records: Sequence[Any], legend: bool = True) -> Any:
    """Captum's ``visualize_text`` table, displayed in a notebook, with the legend of
    :func:`records_html` (relevance for / against the output, not "Positive" / "Negative").

    Returns:
        The displayed ``IPython.display.HTML``.

    Raises:
        ImportError: without IPython; the message names the extra to install.
    """
    from captum.attr import visualization as viz

    if not viz.HAS_IPYTHON:
        raise ImportError(
            f"visualize_text displays HTML in a notebook and needs IPython: {NOTEBOOK_EXTRA}. "
            "Without it, write the same table to a file with records_html(records)."
        )
    from IPython.display import HTML, display

    table = HTML(records_html(records, legend=legend))
    display(table)
    return table


def _swatch(colour: str) -> str:
    return (
        '<span style="display:inline-block;width:10px;height:10px;border:1px solid #999;'
        f'background-color:{colour}"></span>'
    )


LEGEND = (
    "<div><b>Colour = relevance, by sign (not the class):</b> "
    + _swatch("hsl(120, 75%, 50%)")
    + " green: counts for the explained output &nbsp;"
    + _swatch("hsl(0, 75%, 100%)")
    + " white: 0 &nbsp;"
    + _swatch("hsl(0, 75%, 60%)")
    + " red: counts against it. Full colour at the value in each row's Attribution Label.</div>"
)


def image_attr_arguments(
    relevance: Tensor,
    image: Tensor,
    *,
    method: str = "blended_heat_map",
    sign: str = "positive",
    title: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``captum.attr.visualization.visualize_image_attr``.

    The map is upsampled bilinearly to the image and divided by its own ``max |value|``, which
    the title states. Captum rescales every call to the image's own maximum (here
    ``outlier_perc=1e-3`` keeps that the maximum), so its colour bar reads 0 to 1 in units of
    the stated value; to compare images, read the values in the titles.

    Args:
        relevance: one image's map: ``(N,)`` patch tokens of a square grid, ``(h, w)``,
            ``(1, H, W)`` or ``(H, W)``.
        image: ``(3, H, W)`` in ``[0, 1]`` (undo the model's normalisation first).
        method: Captum's ``method`` (``"heat_map"``, ``"blended_heat_map"``, ...).
        sign: Captum's ``sign``.
        title: prefix of the title; the scale is appended.

    Example:
        >>> from captum.attr import visualization as viz
        >>> args = image_attr_arguments(torch.rand(16) * 1e-4, torch.rand(3, 32, 32))
        >>> args["attr"].shape, args["original_image"].shape, float(args["attr"].max())
        ((32, 32, 1), (32, 32, 3), 1.0)
        >>> figure, axis = viz.visualize_image_attr(**args, use_pyplot=False)
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), not {tuple(image.shape)}; pass images[i].")
    if image.min() < 0 or image.max() > 1:
        raise ValueError("image must lie in [0, 1]: undo the model's mean/std normalisation.")
    upsampled = _as_map(relevance, (int(image.shape[1]), int(image.shape[2])))
    value = float(upsampled.abs().max())
    if not value > 0:
        raise ValueError("the map is all zeros: nothing to show. Check the target and the layer.")
    label = f"{title + ' ' if title else ''}(max {value:.2g})"
    return {
        "attr": (upsampled / value)[..., None].numpy(),
        "original_image": image.detach().permute(1, 2, 0).to("cpu", torch.float64).numpy(),
        "method": method,
        "sign": sign,
        "outlier_perc": 1e-3,
        "show_colorbar": True,
        "title": label,
    }


def _as_map(relevance: Tensor, size: tuple[int, int]) -> Tensor:
    values = relevance.detach().to("cpu", torch.float64)
    if values.dim() == 1:
        side = int(round(values.numel() ** 0.5))
        if side * side != values.numel():
            raise ValueError(
                f"{values.numel()} patch values are not a square grid; pass the map as (h, w)."
            )
        values = values.reshape(side, side)
    if values.dim() == 3 and values.shape[0] == 1:
        values = values[0]
    if values.dim() != 2:
        raise ValueError(f"relevance must be (N,), (h, w) or (1, H, W), not {tuple(values.shape)}.")
    if not torch.isfinite(values).all():
        raise ValueError("the map holds NaN or infinity; nothing sensible to draw.")
    return F.interpolate(values[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
