"""Route: Hugging Face transformers models, at any attention implementation.

transformers dispatches attention by ``config._attn_implementation`` and builds the mask to
match it. At ``eager`` (or a flash/flex kernel) the probabilities never reach a place we can
see reversibly, so for the duration of the call every config in the model is switched to
``sdpa``, whose attention goes through the SDPA route and whose mask builder is the matching
one. Switching the name, rather than registering a new one, keeps the mask: transformers 5
builds no padding mask for an implementation name missing from its mask registry. The
original names are written back in ``finally``.

A model class that declares ``_supports_sdpa = False`` (ViLT, LXMERT, VisualBERT: attention
written by hand) keeps its configs as they are: switching them would only change the mask it
is given (a bool mask where its code adds a float one). Its attention is captured by the
hand-written route instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

_SWITCHED = (
    "eager",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
    "flex_attention",
)


def _configs(model: nn.Module) -> list[object]:
    found: dict[int, object] = {}
    kept: set[int] = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            family = {id(config): config} | _sub_configs(config)
            found.update(family)
            if getattr(type(module), "_supports_sdpa", None) is False:
                kept.update(family)
    return [config for key, config in found.items() if key not in kept]


def _sub_configs(config: object) -> dict[int, object]:
    subs = {}
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation_internal"):
            subs[id(sub)] = sub
    return subs


@contextmanager
def huggingface_route(model: nn.Module | None) -> Iterator[None]:
    """Run the model's attention through SDPA for the duration, then restore every config."""
    configs = _configs(model) if model is not None else []
    saved = [(config, config._attn_implementation_internal) for config in configs]  # type: ignore[attr-defined]
    try:
        for config, name in saved:
            if name in _SWITCHED:
                config._attn_implementation_internal = "sdpa"  # type: ignore[attr-defined]
        yield
    finally:
        for config, name in saved:
            config._attn_implementation_internal = name  # type: ignore[attr-defined]
