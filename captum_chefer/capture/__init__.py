"""How attention and its gradient are obtained, reversibly, on the calling thread only.

:func:`capture_attention` runs a block with attention captured into a recorder: the
torch-function mode of :mod:`~captum_chefer.capture.mode` sees every attention call made on this
thread, and models that opt in call :func:`mark_attention`. Models whose attention runs in a
kernel the mode cannot see are refused first (:mod:`~captum_chefer.capture.implementations`).
Nothing on the model is replaced or switched; the mode is popped in ``finally``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from .graph import Dependencies
from .implementations import check_attention_implementations
from .mode import AttentionMode, warn_if_training
from .modules import module_scope
from .patches import scoped_method
from .protocol import mark_attention
from .recorder import (
    BackwardHook,
    CallRecord,
    Recorder,
    active_recorder,
    backward,
    check_token_mixing,
    gradients,
    in_reentrant_checkpoint,
    recording,
)


@contextmanager
def capture_attention(model: nn.Module | None, recorder: Recorder) -> Iterator[Recorder]:
    """Capture every attention call made on this thread into ``recorder`` while the block runs.

    Example:
        >>> import torch
        >>> layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        >>> recorder = Recorder()
        >>> with capture_attention(layer, recorder):
        ...     _ = layer(torch.randn(1, 3, 8))
        >>> [record.shape for record in recorder.records]
        [(1, 2, 3, 3)]
    """
    check_attention_implementations(model)
    with recording(recorder), AttentionMode(recorder):
        yield recorder


__all__ = [
    "AttentionMode",
    "BackwardHook",
    "backward",
    "gradients",
    "in_reentrant_checkpoint",
    "CallRecord",
    "Dependencies",
    "Recorder",
    "active_recorder",
    "capture_attention",
    "check_token_mixing",
    "mark_attention",
    "module_scope",
    "scoped_method",
    "warn_if_training",
]


def __getattr__(name: str) -> Any:
    if name == "Consumer":
        from ..core.readers import Reader

        warnings.warn(
            "captum_chefer.capture.Consumer is deprecated; use captum_chefer.core.Reader.",
            DeprecationWarning,
            stacklevel=2,
        )
        return Reader
    raise AttributeError(f"module 'captum_chefer.capture' has no attribute {name!r}")
