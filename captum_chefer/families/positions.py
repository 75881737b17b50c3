"""Position routes: where a family's patches really sit when its embeddings reorder them.

ViLT draws a random order of its image patches in every forward (and may drop some). The order
drawn is returned by its ``visual_embed`` method; to lay each patch's relevance on its own grid
cell, the method is wrapped for the duration of one attribution, on the calling thread only,
and restored afterwards (:func:`~captum_chefer.capture.scoped_method`).

A family that reorders its patches adds one entry to :data:`PATCH_ORDER_ROUTES`: the method's
name and how its output gives ``(positions (B, P, 2), grid)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..capture import scoped_method
from ..core.mapping import PatchPositions


def _vilt_patch_positions(output: Any) -> PatchPositions:
    """ViLT's ``visual_embed`` returns ``(embeddings, masks, (patch_index, grid))``."""
    _embeddings, _masks, (patch_index, grid) = output
    return patch_index, (int(grid[0]), int(grid[1]))


@dataclass(frozen=True)
class PatchOrderRoute:
    """A method whose output tells where each patch token sits on the grid.

    Attributes:
        method: the name of the method on the model's submodule (its class defines it).
        positions: reads ``(positions (B, P, 2), grid)`` off the method's output.
    """

    method: str
    positions: Callable[[Any], PatchPositions]


PATCH_ORDER_ROUTES: tuple[PatchOrderRoute, ...] = (
    PatchOrderRoute("visual_embed", _vilt_patch_positions),  # ViLT
)
"""The position routes, one per family that reorders its patches."""


@contextmanager
def recorded_patch_positions(model: nn.Module | None) -> Iterator[list[PatchPositions]]:
    """Record the patch positions the model's embeddings draw during the block.

    The list gets one entry per call of a routed method; submodules without one are untouched.
    """
    found: list[PatchPositions] = []
    with ExitStack() as stack:
        for module in model.modules() if model is not None else ():
            for route in PATCH_ORDER_ROUTES:
                if callable(getattr(type(module), route.method, None)):
                    wrapper = functools.partial(_recording, found, route)
                    stack.enter_context(scoped_method(module, route.method, wrapper))
        yield found


def _recording(
    found: list[PatchPositions],
    route: PatchOrderRoute,
    method: Callable[..., Any],
    *args: Any,
    **kwargs: Any,
) -> Any:
    output = method(*args, **kwargs)
    found.append(route.positions(output))
    return output
