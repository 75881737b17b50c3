"""Attention kernels the capture cannot see, refused before the forward runs.

The capture route (:mod:`~captum_chefer.capture.mode`) sees attention computed through
``scaled_dot_product_attention`` or an explicit softmax. Hugging Face models can also be loaded
with kernels that do neither (``flash_attention_2``, ``flex_attention``, a hub kernel); their
attention would silently be missing from the map. Such a model is refused with the call that
switches it to an implementation the capture sees. The model itself is never switched: two
implementations can compute different functions (Falcon with ALiBi at ``eager`` and ``sdpa``),
and the map must explain the model the user loaded.
"""

from __future__ import annotations

from torch import nn

VISIBLE = ("eager", "sdpa")
"""Hugging Face attention implementations whose attention the capture sees."""


def check_attention_implementations(model: nn.Module | None) -> None:
    """Raise if a Hugging Face (sub)model of ``model`` uses an attention kernel we can't see.

    Example:
        >>> import torch
        >>> check_attention_implementations(torch.nn.Linear(2, 2))  # not a HF model: nothing
    """
    for module in model.modules() if model is not None else ():
        config = getattr(module, "config", None)
        name = getattr(config, "_attn_implementation_internal", None)
        if isinstance(name, str) and name not in VISIBLE:
            raise RuntimeError(_message(module, name))


def _message(module: nn.Module, name: str) -> str:
    supports_sdpa = getattr(type(module), "_supports_sdpa", False)
    visible = "sdpa" if supports_sdpa else "eager"
    return (
        f"{type(module).__name__} runs attention with attn_implementation={name!r}, a kernel "
        "whose attention captum_chefer cannot see, so the map would miss it. Switch the model "
        f"to an implementation it sees, with the same weights: "
        f"model.set_attn_implementation({visible!r}), or load it with "
        f"attn_implementation={visible!r}."
    )
