"""Pictures of relevance. Depends on torch only; matplotlib and Captum are imported inside the
functions that draw with them.

- :mod:`~captum_chefer.viz.text`: coloured tokens as HTML or a matplotlib figure, on a stated
  scale, with :func:`add_colour_bar`.
- :mod:`~captum_chefer.viz.tokens`: rows cut to the real tokens, special tokens masked, word
  pieces merged, one shared scale or one per row.
- :mod:`~captum_chefer.viz.records`: Captum's ``VisualizationDataRecord`` and
  ``visualize_image_attr`` arguments from our outputs.
- :mod:`~captum_chefer.viz.curves`: perturbation, deletion and insertion curves, with ↓ / ↑.
- :mod:`~captum_chefer.viz.figures`: a title and a "how to read this" line on every figure, one
  colour bar per figure (from 0 for relevance that is never negative), images with their maps.
"""

from .curves import plot_metric_curves
from .figures import UNTRAINED, colour_bar, from_zero, label_figure, plot_image_maps
from .records import image_attr_arguments, records_html, visualization_records, visualize_text
from .text import (
    add_colour_bar,
    plot_text_heatmap,
    save_text_heatmap,
    text_heatmap_html,
    token_colours,
)
from .tokens import TokenRow, merge_pieces, normalised, row_scales, token_rows

__all__ = [
    "UNTRAINED",
    "TokenRow",
    "add_colour_bar",
    "colour_bar",
    "from_zero",
    "image_attr_arguments",
    "label_figure",
    "merge_pieces",
    "normalised",
    "plot_image_maps",
    "plot_metric_curves",
    "plot_text_heatmap",
    "records_html",
    "row_scales",
    "save_text_heatmap",
    "text_heatmap_html",
    "token_colours",
    "token_rows",
    "visualization_records",
    "visualize_text",
]
