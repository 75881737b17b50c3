"""Model-family knowledge as declarative tables, in one folder; nothing else names a family.

- :mod:`~captum_chefer.families.streams`: the :class:`StreamMap` mechanism (which module's
  attention forms which stream).
- :mod:`~captum_chefer.families.table`: one :class:`Family` entry per multi-stream family.
- :mod:`~captum_chefer.families.pooling`: which text token a dual encoder pools.
- :mod:`~captum_chefer.families.positions`: where reordered patches sit (ViLT), recorded by a
  scoped, undone method wrapper.
"""

from .pooling import TEXT_POOLING, pooled_text_token
from .positions import PATCH_ORDER_ROUTES, recorded_patch_positions
from .streams import StreamMap
from .table import FAMILIES, SELF_ATTENTION, Family, family_for, family_named

__all__ = [
    "FAMILIES",
    "PATCH_ORDER_ROUTES",
    "SELF_ATTENTION",
    "TEXT_POOLING",
    "Family",
    "StreamMap",
    "family_for",
    "family_named",
    "pooled_text_token",
    "recorded_patch_positions",
]
