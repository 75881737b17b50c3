"""Pure tensor math of the relevance rules; imports torch only."""

from .attention import AttentionCall, attention_backward, attention_probs, block_rows_for
from .consumers import MatrixRelevance, RowRelevance
from .rules import RowPropagation, head_reduce, propagate_matrix
from .tokens import apply_self_relevance, infer_patch_layout, token_start_rows, tokens_to_input

__all__ = [
    "AttentionCall",
    "MatrixRelevance",
    "RowPropagation",
    "RowRelevance",
    "apply_self_relevance",
    "attention_backward",
    "attention_probs",
    "block_rows_for",
    "head_reduce",
    "infer_patch_layout",
    "propagate_matrix",
    "token_start_rows",
    "tokens_to_input",
]
