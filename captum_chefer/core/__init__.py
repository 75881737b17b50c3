"""Pure tensor math of the relevance rules; imports torch only.

The deprecated names ``RowReader``, ``RowRelevance``, ``MatrixRelevance`` and
``token_start_rows`` still resolve, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from typing import Any

from .attention import AttentionCall, attention_backward, attention_probs, block_rows_for
from .baselines import (
    AttentionGradCAMReader,
    GradientRolloutReader,
    HeadFusion,
    RawAttentionReader,
    RolloutReader,
    fuse_heads,
    rollout_step,
)
from .bimodal import MultiModalRelevance, MultiStreamReader, normalized_map
from .mapping import infer_patch_layout, split_segments, tokens_to_input
from .readers import (
    AbarStore,
    CheferMatrixReader,
    CheferRowReader,
    Reader,
    ReadSetup,
    StreamLayout,
    check_start_layer,
)
from .rules import RowPropagation, head_reduce, propagate_matrix
from .tokens import apply_self_relevance, row_weights, token_start_rows

_DEPRECATED = {
    "RowReader": (Reader, "Reader"),
    "RowRelevance": (CheferRowReader, "CheferRowReader"),
    "MatrixRelevance": (CheferMatrixReader, "CheferMatrixReader"),
}
"""Old names: what each resolves to, and the name to use instead."""


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        value, new = _DEPRECATED[name]
        warnings.warn(
            f"captum_chefer.core.{name} is deprecated; use captum_chefer.core.{new}.",
            DeprecationWarning,
            stacklevel=2,
        )
        return value
    raise AttributeError(f"module 'captum_chefer.core' has no attribute {name!r}")


__all__ = [
    "AbarStore",
    "AttentionCall",
    "AttentionGradCAMReader",
    "CheferMatrixReader",
    "CheferRowReader",
    "GradientRolloutReader",
    "HeadFusion",
    "MultiModalRelevance",
    "MultiStreamReader",
    "RawAttentionReader",
    "ReadSetup",
    "Reader",
    "RolloutReader",
    "RowPropagation",
    "StreamLayout",
    "apply_self_relevance",
    "attention_backward",
    "attention_probs",
    "block_rows_for",
    "check_start_layer",
    "fuse_heads",
    "head_reduce",
    "infer_patch_layout",
    "propagate_matrix",
    "rollout_step",
    "row_weights",
    "normalized_map",
    "split_segments",
    "token_start_rows",
    "tokens_to_input",
]
