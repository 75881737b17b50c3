"""Model-family knowledge as declarative tables, in one folder; nothing else names a family.

- :mod:`~captum_chefer.families.streams`: the :class:`StreamMap` mechanism (which module's
  attention forms which stream).
- :mod:`~captum_chefer.families.table`: one :class:`Family` entry per multi-stream family.
- :mod:`~captum_chefer.families.positions`: where reordered patches sit (ViLT), recorded by a
  scoped, undone method wrapper.
"""

from .positions import PATCH_ORDER_ROUTES, recorded_patch_positions
from .streams import StreamMap
from .table import FAMILIES, SELF_ATTENTION, Family, explainer_for, family_for, family_named

__all__ = [
    "FAMILIES",
    "PATCH_ORDER_ROUTES",
    "SELF_ATTENTION",
    "Family",
    "StreamMap",
    "explainer_for",
    "family_for",
    "family_named",
    "recorded_patch_positions",
]
