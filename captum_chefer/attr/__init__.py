"""The Captum-facing attribution classes; the only part of the package that imports Captum."""

from .chefer import CheferRelevance

__all__ = ["CheferRelevance"]
