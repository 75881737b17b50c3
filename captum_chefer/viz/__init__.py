"""Pictures of relevance. Depends on torch only; matplotlib is imported inside the functions."""

from .text import plot_text_heatmap, save_text_heatmap, text_heatmap_html, token_colours

__all__ = ["plot_text_heatmap", "save_text_heatmap", "text_heatmap_html", "token_colours"]
