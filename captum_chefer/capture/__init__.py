"""How attention and its gradient are obtained, reversibly.

Each route is a context manager ``route(model)`` in a file of its own; :func:`capture_attention`
enters all of them, in registry order, around one attribution, and leaves the model exactly as
it found it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager

from torch import nn

from .handwritten import handwritten_route
from .huggingface import huggingface_route
from .modules import module_scope
from .multihead import multihead_route
from .protocol import mark_attention
from .recorder import CallRecord, Consumer, Recorder, active_recorder, recording
from .sdpa import sdpa_route
from .timm import timm_route

Route = Callable[[nn.Module | None], AbstractContextManager[None]]

ROUTES: list[Route] = [
    sdpa_route,
    huggingface_route,
    timm_route,
    multihead_route,
    handwritten_route,
]
"""The capture routes, entered in this order. The protocol route needs no entry: the model calls
:func:`mark_attention` itself."""


@contextmanager
def capture_attention(model: nn.Module | None, recorder: Recorder) -> Iterator[Recorder]:
    """Capture every attention call of ``model`` into ``recorder`` while the block runs."""
    with ExitStack() as stack:
        for route in ROUTES:
            stack.enter_context(route(model))
        stack.enter_context(recording(recorder))
        yield recorder


__all__ = [
    "ROUTES",
    "CallRecord",
    "Consumer",
    "Recorder",
    "active_recorder",
    "capture_attention",
    "mark_attention",
    "module_scope",
]
