"""captum_chefer: Chefer et al.'s gradient-weighted attention relevance as a Captum attribution."""

from .attr import CheferRelevance
from .capture import mark_attention

__version__ = "0.1.0"

__all__ = ["CheferRelevance", "mark_attention", "__version__"]
