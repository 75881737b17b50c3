"""Route: the AttnLRP / CP-LRP rules applied to what a model runs, on this thread only.

:func:`lrp_rules` pushes a :class:`torch.overrides.TorchFunctionMode` for the duration of one
forward. The mode follows which tensors depend on the explained inputs ("carried" tensors;
parameters and buffers are constants) and swaps each operation on them for its rule from
:mod:`captum_chefer.core.lrp`, keeping the forward value bit for bit:

- ``F.linear`` → epsilon rule; ``F.layer_norm`` → identity rule on the normalisation;
  ``F.rms_norm`` and element-wise activations → identity rule;
- a hand-written norm (``x * rsqrt(mean(x²) + eps)``, ``x / sqrt(var + eps)``, ``x / ‖x‖``)
  is found from the shape of its computation, and its normaliser is held constant;
- the attention matmuls and softmax the model writes out → uniform and softmax rules, or
  CP-LRP's constant attention; ``scaled_dot_product_attention`` (Hugging Face at ``sdpa``,
  timm, ``nn.MultiheadAttention``) keeps the model's fused kernel, forward and backward, with
  the same rules as its rescaled gradient (:func:`~captum_chefer.core.lrp.fused_attention_rule`):
  no ``(B, H, N, N)`` tensor is formed;
- products of two carried tensors (gates) → uniform rule (CP-LRP: an activated gate is held
  constant, as in Ali et al.);
- ``F.embedding`` of carried ids → a fresh leaf, where the relevance on ids is read.

Element-wise activation modules that are written out by hand (the table
:data:`ELEMENTWISE_MODULE_HOMES`) get the identity rule as a whole through a forward hook that
acts on the calling thread only. The mode is popped and the hooks removed in ``finally``.

The caller runs its backward inside the block, through
:func:`~captum_chefer.capture.gradients`, so that a block that non-reentrant activation
checkpointing recomputes during the backward runs under the same rules (and saves the same
tensors). Reentrant checkpointing runs the block without gradients and cannot be
back-propagated by ``torch.autograd.grad``: :attr:`LRPState.reentrant` names it for a refusal.
"""

from __future__ import annotations

import re
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from ..core.lrp import (
    fused_attention_rule,
    identity_rule,
    layer_norm_rule,
    linear_rule,
    uniform_rule,
)
from .recorder import in_reentrant_checkpoint

Variant = Literal["attnlrp", "cplrp"]

ELEMENTWISE_MODULE_HOMES: tuple[str, ...] = ("transformers.activations", "timm.layers.activations")
"""Modules whose classes are element-wise activations, some written out by hand
(``0.5·x·(1 + tanh(…))``, ``x·sigmoid(1.702·x)``): each gets the identity rule as a whole."""

ELEMENTWISE_MODULE_NAMES = re.compile(r"(GELU|Gelu|Activation|SiLU|Swish|Mish)$")
"""Class names of activation modules defined elsewhere (``BloomGelu`` in its modeling file)."""

TOKEN_LAYER_NAMES: tuple[str, ...] = ("patch_embed",)
"""Attributes naming the token layer of models without ``get_input_embeddings`` (timm)."""


@dataclass
class ReadPoint:
    """A tensor where relevance is read: ``tensor ⊙ its gradient``.

    Attributes:
        tensor: a leaf that replaced the value in the forward.
        origins: bitmask of the explained inputs it depends on.
    """

    tensor: Tensor
    origins: int


@dataclass
class LRPState:
    """What one forward under the rules recorded."""

    variant: Variant
    epsilon: float
    embeddings: list[ReadPoint] = field(default_factory=list)
    layer_outputs: list[ReadPoint] = field(default_factory=list)
    attention_calls: int = 0
    reentrant: bool = False
    """Whether input-dependent operations ran without gradients inside reentrant activation
    checkpointing (``use_reentrant=True``), which the rules cannot follow."""
    _origins: dict[int, tuple[weakref.ref, int]] = field(default_factory=dict)
    _tags: dict[int, tuple[weakref.ref, str]] = field(default_factory=dict)

    def mark(self, value: Any, origins: int) -> None:
        """Record that the tensors in ``value`` depend on the inputs in ``origins``."""
        for tensor in _tensors(value):
            known = self.origins_of(tensor)
            self._origins[id(tensor)] = (weakref.ref(tensor), known | origins)

    def origins_of(self, tensor: Any) -> int:
        if not isinstance(tensor, Tensor):
            return 0
        entry = self._origins.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else 0

    def carried(self, tensor: Any) -> bool:
        """True for a floating tensor that depends on the inputs and is differentiable."""
        return bool(self.origins_of(tensor)) and tensor.requires_grad

    def tag(self, tensor: Tensor, name: str) -> None:
        self._tags[id(tensor)] = (weakref.ref(tensor), name)

    def tag_of(self, tensor: Any) -> str | None:
        entry = self._tags.get(id(tensor)) if isinstance(tensor, Tensor) else None
        return entry[1] if entry is not None and entry[0]() is tensor else None


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, Tensor):
                yield item


def _arg_origins(state: LRPState, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    origins = 0
    for value in (*args, *kwargs.values()):
        for tensor in _tensors(value):
            origins |= state.origins_of(tensor)
    return origins


Handler = Callable[[LRPState, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]


def _linear(state: LRPState, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    call = dict(zip(("input", "weight", "bias"), args)) | kwargs
    x, weight, bias = call["input"], call["weight"], call.get("bias")
    if not state.carried(x) or state.origins_of(weight):
        return func(*args, **kwargs)
    return linear_rule(x, weight, bias, state.epsilon)


def _layer_norm(state: LRPState, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    bound = dict(zip(names, args)) | kwargs
    if not state.carried(bound["input"]):
        return func(*args, **kwargs)
    return layer_norm_rule(
        bound["input"],
        tuple(bound["normalized_shape"]),
        bound.get("weight"),
        bound.get("bias"),
        bound.get("eps", 1e-5),
    )


def _elementwise(state: LRPState, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    out = func(*args, **kwargs)
    if not state.carried(args[0]) or not isinstance(out, Tensor) or out.shape != args[0].shape:
        return out
    result = identity_rule(args[0], out)
    state.tag(result, "activated")
    return result


def _embedding(state: LRPState, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    out = func(*args, **kwargs)
    origins = state.origins_of(args[0])
    if not origins or args[0].is_floating_point():
        return out
    leaf = out.detach().requires_grad_(True)
    state.embeddings.append(ReadPoint(leaf, origins))
    return leaf.clone()  # the model may change its embeddings in place; a leaf can't be


def _softmax(state: LRPState, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    out = func(*args, **kwargs)
    if not state.carried(args[0]):
        return out
    if out.dim() < 3:  # a softmax over classes (or a router's over experts): not attention
        return out
    state.attention_calls += 1
    return out.detach() if state.variant == "cplrp" else out


_DROPOUT = (
    "Attention dropout is active (the model is in training mode), so no LRP rule can follow "
    "the forward. Call model.eval() first."
)
_SDPA_NAMES = (
    "query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa",
)  # fmt: skip


def _sdpa(state: LRPState, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """The model's fused kernel, forward and backward, with the rules as its rescaled gradient."""
    bound = dict(zip(_SDPA_NAMES, args)) | kwargs
    if not any(state.carried(bound[name]) for name in ("query", "key", "value")):
        return func(*args, **kwargs)
    if bound.get("dropout_p", 0.0):
        raise RuntimeError(_DROPOUT)
    state.attention_calls += 1
    query, key, value = bound.pop("query"), bound.pop("key"), bound.pop("value")
    mask = bound.pop("attn_mask", None)
    conservative = state.variant == "cplrp"
    return fused_attention_rule(func, query, key, value, mask, conservative=conservative, **bound)


def _product(state: LRPState, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    a, b = args[0], args[1]
    if a is b and isinstance(a, Tensor):
        out = func(*args, **kwargs)
        state.tag(out, "square")
        return out
    if not (state.carried(a) and state.carried(b)):
        return func(*args, **kwargs)
    a, b = _gate_rule(state, a, b)
    return func(a, b, *args[2:], **kwargs)


def _gate_rule(state: LRPState, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    if state.variant == "cplrp":
        if state.tag_of(a) == "activated":
            return a.detach(), b
        if state.tag_of(b) == "activated":
            return a, b.detach()
    return uniform_rule(a), uniform_rule(b)


def _matmul(state: LRPState, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    a, b = args[0], args[1]
    if not (state.carried(a) and state.carried(b)):
        return func(*args, **kwargs)
    return func(uniform_rule(a), uniform_rule(b), *args[2:], **kwargs)


def _bias_matmul(state: LRPState, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``baddbmm(bias, a, b)`` (ALiBi scores): the uniform rule on the two matrix factors."""
    call = dict(zip(("input", "batch1", "batch2"), args)) | kwargs
    if not (state.carried(call["batch1"]) and state.carried(call["batch2"])):
        return func(*args, **kwargs)
    bias, first, second = call.pop("input"), call.pop("batch1"), call.pop("batch2")
    return func(bias, uniform_rule(first), uniform_rule(second), **call)


def _einsum(state: LRPState, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    operands = list(args[1:]) if len(args) > 1 else []
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if sum(state.carried(operand) for operand in operands) < 2:
        return func(*args, **kwargs)
    if len(operands) != 2:
        raise RuntimeError(_NO_RULE.format(op=f"an einsum of {len(operands)} carried tensors"))
    return func(args[0], *(uniform_rule(operand) for operand in operands), **kwargs)


_NO_RULE = (
    "AttnLRP/CP-LRP has no rule for {op} on input-dependent tensors. Write that part of the "
    "model with torch operations that have one (linear layers, norms, softmax, element-wise "
    "activations, products of two tensors), or explain it with CheferRelevance."
)


def _divide(state: LRPState, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    numerator, divisor = args[0], args[1]
    if not state.carried(divisor):
        return func(*args, **kwargs)
    if state.tag_of(divisor) == "normaliser":
        return func(numerator, divisor.detach(), *args[2:], **kwargs)
    raise RuntimeError(_NO_RULE.format(op="a division by a tensor that is not a norm"))


def _power(state: LRPState, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    out = func(*args, **kwargs)
    if len(args) > 1 and isinstance(args[1], (int, float)) and args[1] == 2:
        state.tag(out, "square")
    return out


def _square(state: LRPState, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    out = func(*args, **kwargs)
    state.tag(out, "square")
    return out


def _mean(state: LRPState, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    out = func(*args, **kwargs)
    if state.tag_of(args[0]) == "square" or func in _VARIANCES:
        state.tag(out, "mean_square")
    return out


def _shift(state: LRPState, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``mean(x²) + eps`` is still a mean of squares."""
    out = func(*args, **kwargs)
    tags = [state.tag_of(arg) for arg in args[:2]]
    if "mean_square" in tags and sum(state.carried(arg) for arg in args[:2]) == 1:
        state.tag(out, "mean_square")
    return out


def _root(state: LRPState, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    out = func(*args, **kwargs)
    if state.tag_of(args[0]) == "mean_square":
        return out.detach()  # the identity rule on the normalisation: a constant factor
    return out


def _norm(state: LRPState, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    out = func(*args, **kwargs)
    if isinstance(out, Tensor):
        state.tag(out, "normaliser")
    return out


def _normalize(state: LRPState, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    out = func(*args, **kwargs)
    return identity_rule(args[0], out) if state.carried(args[0]) else out


_MHA_NAMES = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
    "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight",
    "out_proj_bias", "training", "key_padding_mask", "need_weights", "attn_mask",
)  # fmt: skip


def _multi_head(state: LRPState, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``nn.MultiheadAttention``: torch's own function, its operations under the rules.

    The function is run with the rules active inside it (its own torch-function check turned
    off for this call): the projections get the epsilon rule and its
    ``scaled_dot_product_attention`` the fused rule; with ``need_weights`` its explicit
    attention gets the matmul and softmax rules.
    """
    call = dict(zip(_MHA_NAMES, args)) | kwargs
    if not any(state.carried(call[name]) for name in ("query", "key", "value")):
        return func(*args, **kwargs)
    if call.get("training", True) and call.get("dropout_p", 0.0):
        raise RuntimeError(_DROPOUT)
    namespace = {**func.__globals__, "has_torch_function": lambda *args: False}
    inner = types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__)
    with _RulesMode(state):
        return inner(*args, **kwargs)


_VARIANCES = (torch.var, Tensor.var)
_ACTIVATIONS = (
    F.gelu, F.silu, F.relu, F.mish, F.elu, F.selu, F.leaky_relu, F.hardswish, F.softplus,
    F.sigmoid, F.tanh, F.rms_norm, torch.relu, torch.tanh, torch.sigmoid, Tensor.relu,
    Tensor.tanh, Tensor.sigmoid, torch.rms_norm,
)  # fmt: skip
HANDLERS: dict[Any, Handler] = {
    F.linear: _linear,
    F.layer_norm: _layer_norm,
    torch.layer_norm: _layer_norm,
    F.embedding: _embedding,
    F.scaled_dot_product_attention: _sdpa,
    F.softmax: _softmax,
    torch.softmax: _softmax,
    Tensor.softmax: _softmax,
    F.normalize: _normalize,
    F.multi_head_attention_forward: _multi_head,
    **dict.fromkeys((torch.baddbmm, Tensor.baddbmm), _bias_matmul),
    **dict.fromkeys(_ACTIVATIONS, _elementwise),
    **dict.fromkeys((torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__), _product),
    **dict.fromkeys((torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm), _matmul),
    torch.einsum: _einsum,
    **dict.fromkeys((torch.div, Tensor.div, Tensor.__truediv__, torch.true_divide), _divide),
    **dict.fromkeys((torch.pow, Tensor.pow, Tensor.__pow__), _power),
    **dict.fromkeys((torch.square, Tensor.square), _square),
    **dict.fromkeys((torch.mean, Tensor.mean, *_VARIANCES), _mean),
    **dict.fromkeys((torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__), _shift),
    **dict.fromkeys((torch.rsqrt, Tensor.rsqrt, torch.sqrt, Tensor.sqrt), _root),
    **dict.fromkeys((torch.norm, Tensor.norm, torch.linalg.vector_norm), _norm),
}


class _RulesMode(TorchFunctionMode):
    """Applies :data:`HANDLERS` to calls on carried tensors and tracks what they produce."""

    def __init__(self, state: LRPState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        origins = _arg_origins(self.state, args, kwargs)
        if not origins:
            return func(*args, **kwargs)
        if not torch.is_grad_enabled() and not self.state.reentrant:
            self.state.reentrant = in_reentrant_checkpoint()
        handler = HANDLERS.get(func)
        if handler is not None:
            out = handler(self.state, func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        self.state.mark(out, origins)
        return out


@contextmanager
def lrp_rules(
    model: nn.Module | None,
    variant: Variant,
    inputs: tuple[Tensor, ...],
    *,
    epsilon: float = 1e-6,
    layer: nn.Module | None = None,
) -> Iterator[LRPState]:
    """Run the enclosed forward under the AttnLRP or CP-LRP rules, on this thread only.

    Args:
        model: the module whose hand-written activation modules get the identity rule.
        variant: ``"attnlrp"`` or ``"cplrp"``.
        inputs: the explained inputs; bit ``i`` of a :class:`ReadPoint`'s ``origins`` is
            ``inputs[i]``. Floating inputs must be differentiable leaves.
        epsilon: the epsilon rule's stabiliser for linear layers.
        layer: read the relevance at this module's output instead (its output is replaced by
            a leaf, recorded in ``state.layer_outputs``).

    Yields:
        The :class:`LRPState` that the forward fills.

    Example:
        >>> layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        >>> x = torch.randn(1, 3, 8, requires_grad=True)
        >>> with lrp_rules(layer, "cplrp", (x,)) as state:
        ...     out = layer(x)
        >>> state.attention_calls, torch.equal(out, layer(x))
        (1, True)
    """
    if variant not in ("attnlrp", "cplrp"):
        raise ValueError(f"variant must be 'attnlrp' or 'cplrp', not {variant!r}")
    state = LRPState(variant, epsilon)
    for index, tensor in enumerate(inputs):
        state.mark(tensor, 1 << index)
    with ExitStack() as stack:
        handles = _elementwise_hooks(model, state) + _layer_hook(layer, state)
        for handle in handles:
            stack.callback(handle.remove)
        stack.enter_context(_RulesMode(state))
        yield state


def _on_this_thread() -> Callable[[], bool]:
    owner = threading.get_ident()
    return lambda: threading.get_ident() == owner


def _elementwise_hooks(model: nn.Module | None, state: LRPState) -> list[RemovableHandle]:
    here = _on_this_thread()

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        if not here() or not args or not state.carried(args[0]) or not isinstance(out, Tensor):
            return None
        if out.shape != args[0].shape or _ruled_from(state, out, args[0]):
            return None  # not element-wise, or the module called F.gelu (say): ruled already
        result = identity_rule(args[0], out)
        state.mark(result, state.origins_of(args[0]))
        state.tag(result, "activated")
        return result

    modules = [] if model is None else model.modules()
    return [
        module.register_forward_hook(hook, always_call=True)
        for module in modules
        if _is_elementwise(module)
    ]


def _ruled_from(state: LRPState, out: Tensor, x: Tensor) -> bool:
    """Whether ``out`` is the identity rule's output on ``x`` already."""
    node = out.grad_fn
    if state.tag_of(out) != "activated" or node is None or not node.next_functions:
        return False
    return node.next_functions[0][0] is x.grad_fn


def _is_elementwise(module: nn.Module) -> bool:
    kind = type(module)
    return kind.__module__ in ELEMENTWISE_MODULE_HOMES or bool(
        ELEMENTWISE_MODULE_NAMES.search(kind.__name__)
    )


def _layer_hook(layer: nn.Module | None, state: LRPState) -> list[RemovableHandle]:
    if layer is None:
        return []
    here = _on_this_thread()

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        if not here():
            return None
        if not isinstance(out, Tensor) or not out.is_floating_point():
            raise TypeError(
                f"The token layer {type(module).__name__} returned {type(out).__name__}; the "
                "relevance is read at a module that returns one floating tensor (B, N, D). "
                "Pass layer= such a module."
            )
        origins = _arg_origins(state, args, {})
        leaf = out.detach().requires_grad_(True)
        state.layer_outputs.append(ReadPoint(leaf, origins))
        tokens = leaf.clone()  # the model may change its tokens in place; a leaf can't be
        state.mark(tokens, origins)
        return tokens

    return [layer.register_forward_hook(hook)]


def token_layer(model: nn.Module | None) -> nn.Module:
    """The module whose output holds the token embeddings or patch tokens of ``model``."""
    getter = getattr(model, "get_input_embeddings", None)
    found = getter() if callable(getter) else None
    for name in TOKEN_LAYER_NAMES:
        found = found if found is not None else getattr(model, name, None)
    if not isinstance(found, nn.Module):
        raise ValueError(
            "Cannot find the token layer of this model (no get_input_embeddings(), no "
            "patch_embed). Pass layer= the module whose output is the tokens (B, N, D)."
        )
    return found
