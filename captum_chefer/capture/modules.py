"""Which module made each attention call: the scope that multi-modal rules sort calls by.

A dual encoder runs two towers, an encoder-decoder an encoder, decoder self-attention and
cross-attention; their calls can share shapes, so only the module that made a call tells which
modalities it connects. Inside :func:`module_scope`, every submodule of the model pushes its
qualified name onto the active recorder's ``scope`` when its forward starts and pops it when the
forward ends (also on error), and each :class:`~captum_chefer.capture.recorder.CallRecord`
keeps the innermost name. The hooks are removed in ``finally``. Each hook belongs to one
recorder and acts only on the thread where that recorder is active, so a plain forward on
another thread, or a second attribution of the same model on another thread, is untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from .recorder import Recorder, active_recorder


def _enter(owner: Recorder, name: str, module: nn.Module, args: Any) -> None:
    if active_recorder() is owner:
        owner.scope.append(name)


def _leave(owner: Recorder, module: nn.Module, args: Any, output: Any) -> None:
    if active_recorder() is owner and owner.scope:
        owner.scope.pop()


@contextmanager
def module_scope(model: nn.Module | None, recorder: Recorder) -> Iterator[None]:
    """Tag every attention call ``recorder`` captures with the name of its module.

    Args:
        model: the module whose submodules are tracked; None tracks nothing.
        recorder: the recorder whose calls are tagged.

    Example:
        >>> import torch
        >>> from captum_chefer.capture import Recorder, capture_attention
        >>> model = torch.nn.TransformerEncoder(
        ...     torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2,
        ...     enable_nested_tensor=False)
        >>> recorder = Recorder()
        >>> with module_scope(model, recorder), capture_attention(model, recorder):
        ...     _ = model(torch.randn(1, 3, 8))
        >>> [record.module for record in recorder.records]
        ['layers.0.self_attn', 'layers.1.self_attn']
    """
    handles: list[RemovableHandle] = []
    try:
        for name, module in model.named_modules() if model is not None else ():
            enter = functools.partial(_enter, recorder, name)
            leave = functools.partial(_leave, recorder)
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
