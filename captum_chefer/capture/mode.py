"""The capture route: a thread-local ``TorchFunctionMode`` that sees every attention call.

While an attribution runs its forward, this mode is pushed on the calling thread's
torch-function mode stack. It sees each call of a torch function made on that thread, however
the function was imported (``from torch.nn.functional import scaled_dot_product_attention``
included), and nothing on other threads; it is popped in ``finally``. Nothing on the model or
in any module is replaced. The model runs as it was loaded:

- ``scaled_dot_product_attention`` (Hugging Face at ``sdpa``, timm with ``fused_attn``, custom
  code) is handed to the recorder, which runs the model's own fused kernel forward;
- a softmax over the last dimension of a 4-D tensor ``(B, H, Nq, Nk)`` is the probabilities of
  attention computed explicitly (Hugging Face at ``eager``, timm without ``fused_attn``, the
  hand-written attention of ViLT, LXMERT, DeBERTa, …): its output passes through the recorder,
  whose backward sees ``dA``;
- ``nn.MultiheadAttention``'s functional core runs its SDPA branch (the weights it returns when
  asked for are recomputed from the same query and key);
- a softmax over ``N + 1`` keys whose last column the model then drops (an attention *sink*,
  as in GPT-OSS) is captured at the slice: the probabilities applied to the values;
- active dropout is noted, so that the attribution can warn that the map is random;
- operations that mix tokens outside attention are noted (see :func:`token_mixing`), so that
  the attribution can refuse where Chefer's rule, which propagates relevance through attention
  only, would silently leave them out.

A softmax over the last dimension of a 3-D ``(B*H, N, N)`` tensor is attention with its heads
folded into the batch (older Hugging Face code): it is captured too, and split into ``(B, H, N,
N)`` (batch-major, as ``view(B * H, N, N)`` folds them) once the explained batch is known.
Softmaxes over 2-D tensors (a router's ``(tokens, experts)``, a classifier's output) pass
through untouched. Softmaxes that look like attention in a layout the capture cannot read (a
non-last dimension, five dimensions; an attention-pooling head's ``(B, N, 1)`` over the tokens)
are noted with the token-mixing operations, so that the attribution refuses rather than
silently missing them where the explained output depends on them.
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..core.attention import AttentionCall, attention_probs
from .recorder import Recorder

_SOFTMAX = {F.softmax, torch.softmax, Tensor.softmax, torch.special.softmax}
_DROPOUT = {F.dropout, torch.dropout, torch.nn.functional.dropout1d, F.dropout2d}
_SDPA = F.scaled_dot_product_attention
_MHA = F.multi_head_attention_forward


def _sdpa_signature(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """The arguments of ``scaled_dot_product_attention``, to bind a call's args by name."""


_SDPA_ARGS = inspect.signature(_sdpa_signature)


class AttentionMode(TorchFunctionMode):
    """Hands the attention calls made on this thread to ``recorder`` (see the module docs)."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder
        self._sinks: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA:
            return captured_sdpa(self.recorder, *args, **kwargs)
        if func in _SOFTMAX:
            return self._softmax(func, args, kwargs)
        if func is _MHA:
            return _multi_head_attention(self.recorder, args, kwargs)
        if func in _DROPOUT:
            self._note_dropout(args, kwargs)
        if func is Tensor.__getitem__ and self._sinks.get(id(args[0])) is args[0]:
            return self._without_sink(func, args, kwargs)
        result = func(*args, **kwargs)
        self.recorder.note_derived(args, kwargs, result)
        output = result[0] if isinstance(result, tuple) else result
        if not isinstance(output, Tensor) or output.grad_fn is None:
            return result
        if func in _MIXING:
            mixing = token_mixing(func, args, kwargs)
            if mixing is not None:
                convolution = func in _CONVOLUTIONS or func is F.unfold
                self.recorder.note_mixing(mixing[0], output, mixing[1], convolution=convolution)
        elif func in _PRODUCTS:
            product = content_product(func, args, self.recorder.captured_nodes())
            if product is not None:
                self.recorder.note_mixing(product[0], output, product[1], per_token=product[2])
        elif func in _SHIFTS:
            for description, size in token_shifts(func, args, kwargs):
                self.recorder.note_mixing(description, output, None, tokens_at=size)
        return result

    def _softmax(self, func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        probs = func(*args, **kwargs)
        if not isinstance(probs, Tensor) or probs.dim() < 2:
            return probs
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        last = dim in (-1, probs.dim() - 1)
        if probs.dim() == 2:  # a router's (tokens, experts), classes, or pooling (B, N)
            if last and probs.grad_fn is not None:
                description = f"softmax over dim {dim} of {tuple(probs.shape)}"
                batch, size = probs.shape
                self.recorder.note_mixing(description, probs, batch, tokens_at=size)
            return probs
        if probs.dim() == 4 and last and probs.shape[3] == probs.shape[2] + 1:
            captured = self.recorder.probabilities(probs)
            self._sinks[id(captured)] = captured  # a sink, if the model slices it off
            return captured
        if probs.dim() == 4 and last:
            return self.recorder.probabilities(probs)
        square = probs.shape[-1] == probs.shape[-2]
        if probs.dim() == 3 and last and square:
            return self.recorder.probabilities(probs.unsqueeze(1), folded=True).squeeze(1)
        if probs.dim() > 4 or not last or square:
            description = f"softmax over dim {dim} of {tuple(probs.shape)}"
            self.recorder.note_mixing(description, probs, None, unread=True)
        return probs

    def _without_sink(self, func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        """The slice of a sink softmax that keeps the real keys: the attention applied to V.

        The softmax over ``N + 1`` keys was captured as it was (it may be cross-attention to
        ``N + 1`` tokens); once the model slices it to ``(B, H, N, N)``, the slice replaces it.
        """
        probs = self._sinks.pop(id(args[0]))
        kept = func(*args, **kwargs)
        batch, heads, n_query, _ = probs.shape
        if isinstance(kept, Tensor) and tuple(kept.shape) == (batch, heads, n_query, n_query):
            self.recorder.supersede(probs)
            return self.recorder.probabilities(kept)
        return kept

    def _note_dropout(self, args: tuple, kwargs: dict[str, Any]) -> None:
        p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
        training = kwargs.get("training", args[2] if len(args) > 2 else True)
        if training and p > 0:
            self.recorder.dropout_active = True


_CONVOLUTIONS = {
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
}
_CUMULATIVE = {
    op
    for name in ("cumsum", "cumprod", "logcumsumexp", "cummax", "cummin")
    for op in (getattr(torch, name), getattr(Tensor, name))
}
_FFT = {
    getattr(torch.fft, name)
    for name in torch.fft.__all__
    if "fft" in name and "freq" not in name and "shift" not in name
}
_RECURRENT = {torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu}
_MIXING = _CONVOLUTIONS | _CUMULATIVE | _FFT | _RECURRENT | {F.unfold}


def token_mixing(
    func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]
) -> tuple[str, int | None] | None:
    """How ``func(*args, **kwargs)`` mixes positions of its input, or None where it does not.

    Returns a description and, for a convolution, the batch size of its input (a convolution
    over a per-token axis, with the tokens folded into the batch, is not token mixing; the
    caller compares it with the explained batch). The operations that mix positions along an
    axis are: a convolution (or ``unfold``) whose kernel spans more than one position, a
    cumulative sum, product or scan, an FFT, and a recurrent layer (LSTM, GRU, RNN).
    A kernel of size 1 (a position-wise linear map, as in SqueezeBERT) does not mix.

    Example:
        >>> weight = torch.ones(4, 1, 3)
        >>> token_mixing(F.conv1d, (torch.ones(2, 4, 7), weight), {"groups": 4})
        ('conv1d with kernel (3,)', 2)
        >>> token_mixing(F.conv1d, (torch.ones(2, 4, 7), torch.ones(8, 4, 1)), {}) is None
        True
    """
    name = getattr(func, "__name__", str(func))
    if func in _CONVOLUTIONS:
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        kernel = tuple(weight.shape[2:])
        if max(kernel, default=1) <= 1:
            return None
        return f"{name} with kernel {kernel}", args[0].shape[0]
    if func is F.unfold:
        size = args[1] if len(args) > 1 else kwargs["kernel_size"]
        kernel = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if max(kernel) <= 1:
            return None
        return f"unfold with kernel {kernel}", args[0].shape[0]
    tensor = args[0] if args else None
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        return None
    if func in _CUMULATIVE:
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        if tensor.dim() == 0 or tensor.shape[dim] <= 1:
            return None
        return name, None
    return name, None


_PRODUCTS = {
    torch.matmul,
    Tensor.matmul,
    Tensor.__matmul__,
    Tensor.__rmatmul__,
    torch.bmm,
    Tensor.bmm,
    torch.einsum,
}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_SHIFTS = {F.pad, torch.roll, Tensor.roll, *_CAT}


def content_product(
    func: Callable[..., Any], args: tuple, captured: set[Any]
) -> tuple[str, int, tuple[int, ...]] | None:
    """A batched product of two computed tensors that may mix tokens, or None.

    Returns a description, the batch size (the first axis, which both operands share) and the
    other batch sizes followed by the size summed over (see ``MixingRecord.per_token``). Linear
    attention (``K^T V``, or scores ``Q K^T`` that no softmax normalises, applied to ``V``) and
    a pooling weighted by the content are such products. Not such a product: one with a
    weight (a parameter, or a view or slice of one: stacked experts), a 2-D operand, and the
    application of captured attention probabilities to the values (``A V``).

    Example:
        >>> tokens = torch.randn(2, 4, 5, 8, requires_grad=True)
        >>> keys, values = tokens.exp(), tokens.sin()
        >>> content_product(torch.matmul, (keys.transpose(-1, -2), values), set())
        ('matmul over an axis of size 5', 2, (4, 5))
        >>> weight = nn.Parameter(torch.randn(3, 8, 8))
        >>> content_product(torch.matmul, (values[0, :3], weight), set()) is None
        True
    """
    if func is torch.einsum:
        return _einsum_product(args, captured)
    left, right = args[0], args[1] if len(args) > 1 else None
    if func is Tensor.__rmatmul__:
        left, right = right, left
    if not (isinstance(left, Tensor) and isinstance(right, Tensor)):
        return None
    operands = (left, right)
    if not all(t.dim() >= 3 and t.requires_grad for t in operands):
        return None
    if left.shape[0] != right.shape[0] or left.shape[-1] <= 1:
        return None
    if any(_origin(t, captured) != "content" for t in operands):
        return None
    batched = tuple(torch.broadcast_shapes(left.shape[1:-2], right.shape[1:-2]))
    summed = left.shape[-1]
    return f"matmul over an axis of size {summed}", left.shape[0], (*batched, summed)


def _einsum_product(args: tuple, captured: set[Any]) -> tuple[str, int, tuple[int, ...]] | None:
    equation, *operands = args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or len(operands) != 2 or "." in equation:
        return None
    if not all(isinstance(t, Tensor) and t.dim() >= 2 and t.requires_grad for t in operands):
        return None
    inputs, _, out = equation.replace(" ", "").partition("->")
    terms = inputs.split(",")
    if len(terms) != 2 or any(len(term) != t.dim() for term, t in zip(terms, operands)):
        return None
    size = {letter: n for term, t in zip(terms, operands) for letter, n in zip(term, t.shape)}
    if not out:
        out = "".join(sorted(c for c in size if inputs.count(c) == 1))
    summed = [c for c in size if c not in out and c in terms[0] and c in terms[1]]
    shared = [c for c in out if c in terms[0] and c in terms[1]]
    if not summed or not shared or terms[0][0] != terms[1][0] or terms[0][0] not in shared:
        return None
    if any(_origin(t, captured) != "content" for t in operands):
        return None
    total = 1
    for letter in summed:
        total *= size[letter]
    batched = tuple(size[c] for c in shared[1:])
    return f"einsum {equation} over an axis of size {total}", size[terms[0][0]], (*batched, total)


_VIEWS = (
    "View", "UnsafeView", "Reshape", "T", "Transpose", "Permute", "Select", "Index", "Slice",
    "Expand", "Squeeze", "Unsqueeze", "Clone", "ToCopy", "Alias", "Unbind", "Split", "Chunk",
)  # fmt: skip


def _origin(tensor: Tensor, captured: set[Any], hops: int = 4) -> str:
    """``"weight"`` for a parameter or a view, slice or cast of one; ``"attention"`` for
    captured probabilities or what single-input steps make of them (dropout, a cast, a
    reshape); ``"content"`` otherwise (what the model computed from its inputs)."""
    node = tensor.grad_fn
    if node is None:
        return "weight"
    weight: Any = node
    while (
        weight is not None
        and type(weight).__name__.rstrip("0123456789")[: -len("Backward")] in _VIEWS
    ):
        children = [child for child, _ in weight.next_functions if child is not None]
        weight = children[0] if len(children) == 1 else None
    if weight is not None and type(weight).__name__ == "AccumulateGrad":
        return "weight"
    for _ in range(hops):
        if node in captured:
            return "attention"
        children = [child for child, _ in node.next_functions if child is not None]
        if len(children) != 1:
            break
        node = children[0]
    return "attention" if node in captured else "content"


def token_shifts(
    func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]
) -> list[tuple[str, int]]:
    """The shifts of content along an axis that ``func`` makes, each with the axis's size.

    A padding that adds positions on one side of an axis and crops as many on the other (the
    time shift of RWKV-style token mixing), and a roll. Padding on both sides, or cropping,
    moves nothing from one position to another.

    Example:
        >>> x = torch.ones(2, 7, 4)
        >>> token_shifts(F.pad, (x, (0, 0, 1, -1)), {})
        [('pad shifting dim 1 by 1', 7)]
        >>> token_shifts(F.pad, (x, (0, 0, 0, 3)), {})
        []
        >>> v = torch.randn(2, 7, 4, requires_grad=True) * 2
        >>> token_shifts(torch.cat, ([v[:, :1] * 0, v[:, :-1]], 1), {})
        [('cat shifting dim 1 by 1', 7)]
        >>> token_shifts(torch.cat, ([v[:, :1], v[:, 1:]], 1), {})
        []
    """
    if func in _CAT:
        pieces = args[0] if args else kwargs.get("tensors", ())
        rank = pieces[0].dim() if pieces and isinstance(pieces[0], Tensor) else 0
        return _features_kept(_shifted_slices(args, kwargs), rank)
    tensor = args[0] if args else kwargs.get("input")
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        return []
    return _features_kept(_shifts(func, tensor, args, kwargs), tensor.dim())


def _features_kept(found: list[tuple[str, int, int]], rank: int) -> list[tuple[str, int]]:
    """Shifts along the tokens only: the last axis of a tensor of three or more is features
    (rotary embeddings rotate halves of it; the scores' path aside, that moves no token)."""
    return [(text, size) for text, size, dim in found if rank < 3 or dim != rank - 1]


def _shifts(
    func: Callable[..., Any], tensor: Tensor, args: tuple, kwargs: dict[str, Any]
) -> list[tuple[str, int, int]]:
    if func is F.pad:
        pad = args[1] if len(args) > 1 else kwargs["pad"]
        pairs = zip(pad[::2], pad[1::2])
        return [
            (f"pad shifting dim {dim} by {before}", tensor.shape[dim], dim)
            for dim, (before, after) in zip(range(tensor.dim() - 1, -1, -1), pairs)
            if before * after < 0
        ]
    shifts = args[1] if len(args) > 1 else kwargs["shifts"]
    dims = args[2] if len(args) > 2 else kwargs.get("dims")
    if dims is None:
        return [("roll over the flattened tensor", tensor.numel(), -1)]
    shifts = shifts if isinstance(shifts, (tuple, list)) else (shifts,)
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    return [
        (f"roll over dim {dim % tensor.dim()}", tensor.shape[dim], dim % tensor.dim())
        for shift, dim in zip(shifts, dims)
        if shift and tensor.shape[dim] > 1
    ]


def _shifted_slices(args: tuple, kwargs: dict[str, Any]) -> list[tuple[str, int, int]]:
    """The slices that ``torch.cat`` puts back at another offset along the axis they were
    cut from, in a tensor as long as the one sliced (``cat([state, v[:, :-1]], 1)``: a time
    shift). A slice put back where it was (a class token kept in front) moves nothing."""
    pieces = args[0] if args else kwargs["tensors"]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not pieces or not all(isinstance(piece, Tensor) for piece in pieces):
        return []
    rank = pieces[0].dim()
    if rank == 0:
        return []
    dim %= rank
    total = sum(piece.shape[dim] for piece in pieces)
    found: list[tuple[str, int, int]] = []
    offset = 0
    for piece in pieces:
        node = piece.grad_fn
        if type(node).__name__ == "SliceBackward0" and node._saved_dim % rank == dim:
            size = node._saved_self_sym_sizes[dim]
            start = node._saved_start
            start = start - 2**64 if start >= 2**63 else start  # stored unsigned
            start = start + size if start < 0 else start
            if size == total and offset != start:
                found.append((f"cat shifting dim {dim} by {offset - start}", total, dim))
        offset += piece.shape[dim]
    return found


def captured_sdpa(recorder: Recorder, *args: Any, **kwargs: Any) -> Tensor:
    """``scaled_dot_product_attention`` whose call is handed to ``recorder``.

    3-D inputs ``(B, N, D)`` are one head; they are captured as ``(B, 1, N, D)``.
    """
    bound = _SDPA_ARGS.bind(*args, **kwargs).arguments
    query, key, value = bound["query"], bound["key"], bound["value"]
    if query.dim() == 3:
        squeezed = {**bound, "query": query[:, None], "key": key[:, None], "value": value[:, None]}
        mask = bound.get("attn_mask")
        if isinstance(mask, Tensor) and mask.dim() == 3:
            squeezed["attn_mask"] = mask[:, None]
        return captured_sdpa(recorder, **squeezed)[:, 0]
    if query.dim() != 4 or query.is_nested:
        raise RuntimeError(
            "scaled_dot_product_attention was called with a query of shape "
            f"{tuple(query.shape)}; captum_chefer captures (B, H, N, D) or (B, N, D) calls. "
            "Call it with the heads in their own dimension."
        )
    scale = bound.get("scale")
    is_causal = bool(bound.get("is_causal", False))
    call = AttentionCall(
        query,
        key,
        value,
        bound.get("attn_mask"),
        is_causal,
        scale if scale is not None else query.shape[-1] ** -0.5,
    )
    dropout_p = float(bound.get("dropout_p", 0.0))
    if dropout_p > 0.0:
        recorder.dropout_active = True
        return _explicit_attention(recorder, call, dropout_p)
    kernel_kwargs: dict[str, Any] = {"is_causal": is_causal, "scale": scale}
    if key.shape[1] != query.shape[1]:
        kernel_kwargs["enable_gqa"] = True
    return recorder.attention(_SDPA, call, kernel_kwargs)


def _explicit_attention(recorder: Recorder, call: AttentionCall, dropout_p: float) -> Tensor:
    """Attention dropout is random: materialise ``A`` so that its backward sees the same draw."""
    probs = recorder.probabilities(attention_probs(call, differentiable=True).to(call.query.dtype))
    heads = call.query.shape[1]
    value = call.value.repeat_interleave(heads // call.value.shape[1], dim=1)
    return torch.matmul(F.dropout(probs, p=dropout_p, training=True), value)


def _multi_head_attention(recorder: Recorder, args: tuple, kwargs: dict[str, Any]) -> Any:
    """``multi_head_attention_forward`` through its SDPA branch, which the recorder sees.

    Runs torch's own function with two of its global names rebound for this call only: the
    torch-function check (this mode already dispatched it) and the SDPA it calls. The weights
    the caller asked for are recomputed from the captured query and key.
    """
    bound = inspect.signature(_MHA).bind(*args, **kwargs).arguments
    need_weights = bound.pop("need_weights", True)
    average = bound.pop("average_attn_weights", True)
    output, _ = _mha_through(recorder)(**bound, need_weights=False)
    if not need_weights:
        return output, None
    last = recorder.last  # the SDPA call just made, fused or (with dropout) explicit
    probs = attention_probs(last) if isinstance(last, AttentionCall) else last
    assert probs is not None
    weights = probs.detach().to(output.dtype)
    if average:
        weights = weights.mean(1)
    if bound["query"].dim() == 2:
        weights = weights.squeeze(0)
    return output, weights


def _mha_through(recorder: Recorder) -> Callable[..., Any]:
    namespace = {
        **_MHA.__globals__,
        "has_torch_function": lambda *args: False,
        "scaled_dot_product_attention": functools.partial(captured_sdpa, recorder),
    }
    return types.FunctionType(_MHA.__code__, namespace, _MHA.__name__, _MHA.__defaults__)


def warn_if_training(model: nn.Module | None, recorder: Recorder, stacklevel: int) -> None:
    """Warn when the model ran in training mode, judged by what ran, not by a wrapper's flag.

    Dropout that was applied makes the relevance random; otherwise a leaf module (a layer with
    no children: not ``DataParallel`` or another wrapper) in training mode is reported.
    """
    leaves = [m for m in (model.modules() if model is not None else ()) if not any(m.children())]
    if recorder.dropout_active:
        detail = "dropout was applied, so the relevance is random"
    elif any(module.training for module in leaves):
        detail = "no dropout was applied, but other layers may behave as in training"
    else:
        return
    warnings.warn(
        f"The model is in training mode: {detail}. Call model.eval() first for the "
        "explanation of the deployed model; captum_chefer does not change the mode for you.",
        stacklevel=stacklevel,
    )
