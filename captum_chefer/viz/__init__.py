"""Pictures of relevance. Depends on torch only; matplotlib and Captum are imported inside the
functions that draw with them.

- :mod:`~captum_chefer.viz.text`: coloured tokens as HTML or a matplotlib figure, on a stated
  scale, with :func:`add_colour_bar`.
- :mod:`~captum_chefer.viz.tokens`: rows cut to the real tokens, special tokens masked, word
  pieces merged, one shared scale or one per row.
- :mod:`~captum_chefer.viz.records`: Captum's ``VisualizationDataRecord`` and
  ``visualize_image_attr`` arguments from our outputs.
- :mod:`~captum_chefer.viz.curves`: perturbation, deletion and insertion curves.
"""

from .curves import plot_metric_curves
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
    "TokenRow",
    "add_colour_bar",
    "image_attr_arguments",
    "merge_pieces",
    "normalised",
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
