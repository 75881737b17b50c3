"""Route: timm attention modules with ``fused_attn=False``.

timm's ``Attention`` computes the softmax by hand unless ``fused_attn`` is set, in which case
it calls SDPA. For the duration of the call each such module flag is set, so the SDPA route
sees the attention; the flags are restored in ``finally``. timm itself is not imported: any
module with a boolean ``fused_attn`` attribute is treated this way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

_FLAG = "fused_attn"


@contextmanager
def timm_route(model: nn.Module | None) -> Iterator[None]:
    """Set ``fused_attn=True`` on every module that has it off, then restore."""
    switched = [
        module
        for module in (model.modules() if model is not None else ())
        if getattr(module, _FLAG, None) is False
    ]
    try:
        for module in switched:
            setattr(module, _FLAG, True)
        yield
    finally:
        for module in switched:
            setattr(module, _FLAG, False)
