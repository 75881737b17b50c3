"""Pure tensor math of the relevance rules; imports torch only."""

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
from .consumers import MatrixRelevance, RowRelevance
from .readers import CheferMatrixReader, CheferRowReader, ReadSetup, RowReader
from .rules import RowPropagation, head_reduce, propagate_matrix
from .tokens import apply_self_relevance, infer_patch_layout, token_start_rows, tokens_to_input

__all__ = [
    "AttentionCall",
    "AttentionGradCAMReader",
    "CheferMatrixReader",
    "CheferRowReader",
    "GradientRolloutReader",
    "HeadFusion",
    "MatrixRelevance",
    "RawAttentionReader",
    "ReadSetup",
    "RolloutReader",
    "RowPropagation",
    "RowReader",
    "RowRelevance",
    "apply_self_relevance",
    "attention_backward",
    "attention_probs",
    "block_rows_for",
    "fuse_heads",
    "head_reduce",
    "infer_patch_layout",
    "propagate_matrix",
    "rollout_step",
    "token_start_rows",
    "tokens_to_input",
]
