"""Pooling rules: which text token a dual encoder's text embedding is pooled from.

The first rule that applies to the model gives the token; with none, the last real token is
read. A family that pools its text elsewhere adds one entry to :data:`TEXT_POOLING`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.tokens import TokenIndex


def _eos_token_id(model: nn.Module) -> int | None:
    eos = getattr(getattr(model, "text_model", None), "eos_token_id", None)
    return None if eos is None else int(eos)


def _eot_index(model: nn.Module, input_ids: Tensor) -> TokenIndex:
    """CLIP pools the EOT token: the highest id when ``eos_token_id`` is 2 (the original CLIP
    configs), else the first ``eos_token_id``."""
    eos = _eos_token_id(model)
    assert eos is not None, "the rule applies to models with an eos_token_id"
    ids = input_ids.to(torch.int)
    return ids.argmax(-1) if eos == 2 else ids.eq(eos).int().argmax(-1)


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", ""))


@dataclass(frozen=True)
class TextPooling:
    """One pooling rule.

    Attributes:
        applies: whether the rule applies to the model.
        token_index: the pooled token of each text, from the model and the ids ``(B, T)``.
    """

    applies: Callable[[nn.Module], bool]
    token_index: Callable[[nn.Module, Tensor], TokenIndex]


TEXT_POOLING: tuple[TextPooling, ...] = (
    TextPooling(lambda model: _eos_token_id(model) is not None, _eot_index),  # CLIP
    TextPooling(lambda model: _model_type(model).startswith("siglip"), lambda m, ids: -1),
)
"""The rules, in order; the first that applies is used."""


def pooled_text_token(model: nn.Module | None, input_ids: Tensor) -> TokenIndex:
    """The token a dual encoder's text embedding is pooled from; ``"auto"`` if no rule applies.

    Example:
        >>> pooled_text_token(None, torch.tensor([[5, 7, 2]]))
        'auto'
    """
    if model is None:
        return "auto"
    for rule in TEXT_POOLING:
        if rule.applies(model):
            return rule.token_index(model, input_ids)
    return "auto"
