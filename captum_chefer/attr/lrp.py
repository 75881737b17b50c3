"""``AttnLRP`` and ``CPLRP``: layer-wise relevance propagation through unmodified transformers."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..capture import gradients
from ..capture.lrp import ReadPoint, Variant, lrp_rules, token_layer
from ._captum import (
    TargetType,
    _format_output,
    _format_tensor_into_tuples,
    _is_tuple,
    _run_forward,
    log_usage,
)
from .base import ModelAttribution
from .checks import check_output
from .engine import Output, empty_batch, empty_maps
from .inputs import check_inputs, check_target, target_range_error
from .trace import REENTRANT, as_tensor, default_target, select_one_per_example

NO_ATTENTION = (
    "{name} saw no attention on the path from the inputs to the output: no softmax and no "
    "scaled_dot_product_attention of input-dependent tensors. Load Hugging Face models with "
    "attn_implementation='sdpa' or 'eager' (flash-attn kernels and custom CUDA ops are not "
    "visible), and check that forward_func runs the model on inputs."
)


class _LRPAttribution(ModelAttribution):
    """Shared flow: one forward under the rules, one gradient, gradient × input at the reads."""

    variant: ClassVar[Variant]
    multiplies: ClassVar[bool] = True

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        output: Output = "input",
        layer: nn.Module | None = None,
        epsilon: float = 1e-6,
    ) -> Tensor | tuple[Tensor, ...]:
        r"""Relevance of each input position for ``target``.

        Args:
            inputs: a tensor or tuple of tensors, passed first to ``forward_func``: token ids
                ``(B, T)`` (relevance read at the embedding output, summed over features),
                embeddings ``(B, T, D)`` or images ``(B, C, H, W)``.
            target: Captum's target: an int, a tuple, a tensor, or one per example. None on a
                multi-class output explains the predicted class.
            additional_forward_args: passed positionally after ``inputs`` (masks, …); they are
                constants of the explanation.
            output: ``"input"`` returns relevance shaped like each input; ``"token"`` reads it
                at the token embeddings or patch tokens, summed over features: ``(B, N)``.
            layer: with ``output="token"``, the module whose output holds the tokens
                ``(B, N, D)``; found from ``get_input_embeddings()`` or ``patch_embed`` when
                None.
            epsilon: the epsilon rule's stabiliser ε ≥ 0 at linear layers (0 is LRP-0).

        Returns:
            Relevance shaped like ``inputs`` (ids: ``(B, T)``; a tuple for a tuple), or
            ``(B, N)`` with ``output="token"``. Biases keep their share, so the sum equals the
            explained logit only for bias-free models (and, for AttnLRP, up to the softmax's
            bias term).
        """
        check_output(output)
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} needs gradients, which torch.inference_mode() forbids; "
                "call attribute outside it (torch.no_grad() around it is fine)."
            )
        if epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, not {epsilon}")
        check_inputs(inputs, additional_forward_args, self.model)
        is_inputs_tuple = _is_tuple(inputs)
        formatted = _format_tensor_into_tuples(inputs)
        if empty_batch(formatted):
            return _format_output(is_inputs_tuple, empty_maps(formatted, output))
        leaves = tuple(_as_leaf(tensor) for tensor in formatted)
        if output == "token" and layer is None:
            layer = token_layer(self.model)
        if self.model is not None and _in_training(self.model):
            warnings.warn(
                "The model is in training mode: dropout makes the relevance random. Call "
                "model.eval() first; captum_chefer does not change the mode for you.",
                stacklevel=3,
            )
        rules = lrp_rules(self.model, self.variant, leaves, epsilon=epsilon, layer=layer)
        with torch.enable_grad(), rules as state:  # enable_grad: also under the caller's no_grad
            selected = self._forward(state, leaves, target, additional_forward_args)
            # The backward runs under the rules too: blocks that activation checkpointing
            # recomputes then follow them.
            if output == "token":
                return _read_tokens(state.layer_outputs, selected)
            read = _read_inputs(leaves, state.embeddings, selected)
        return _format_output(is_inputs_tuple, read)

    def _forward(
        self,
        state: Any,
        leaves: tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: Any,
    ) -> Tensor:
        name = type(self).__name__
        out = as_tensor(_run_forward(self.forward_func, leaves, None, additional_forward_args))
        if state.reentrant:
            raise RuntimeError(REENTRANT.format(modules="the checkpointed blocks"))
        if not state.attention_calls:
            raise RuntimeError(NO_ATTENTION.format(name=name))
        valid = check_target(out, target)
        if valid is not None and not bool(valid.all()):  # a target tensor on an accelerator
            raise target_range_error(out, target)
        selected = select_one_per_example(out, default_target(out, target))
        if not selected.requires_grad:
            raise RuntimeError(
                f"{name}: the selected output does not depend on the inputs; check that "
                "forward_func runs the model on inputs."
            )
        return selected


def _in_training(model: nn.Module) -> bool:
    """Judged by the modules that compute (leaves), not by wrappers around the model."""
    return any(m.training for m in model.modules() if next(m.children(), None) is None)


def _as_leaf(tensor: Tensor) -> Tensor:
    if tensor.is_floating_point():
        return tensor.detach().requires_grad_(True)
    return tensor


def _relevance(points: list[Tensor], selected: Tensor) -> list[Tensor]:
    grads = gradients(selected.sum(), points)
    return [
        point.detach() * grad if grad is not None else torch.zeros_like(point)
        for point, grad in zip(points, grads)
    ]


def _read_inputs(
    leaves: tuple[Tensor, ...], embeddings: list[ReadPoint], selected: Tensor
) -> tuple[Tensor, ...]:
    """Gradient × input on floating inputs; on ids, the embedding outputs summed over features."""
    floats = [leaf for leaf in leaves if leaf.is_floating_point()]
    values = _relevance(floats + [point.tensor for point in embeddings], selected)
    by_float = dict(zip(map(id, floats), values[: len(floats)]))
    read = []
    for index, leaf in enumerate(leaves):
        if leaf.is_floating_point():
            read.append(by_float[id(leaf)])
            continue
        mine = [
            value.sum(-1)
            for point, value in zip(embeddings, values[len(floats) :])
            if point.origins == 1 << index and value.shape[:-1] == leaf.shape
        ]
        if not mine:
            raise RuntimeError(
                f"Input {index} holds integer ids, but no embedding lookup of them was seen. "
                "Pass the embeddings instead (inputs_embeds), or output='token'."
            )
        read.append(torch.stack(mine).sum(0))
    return tuple(read)


def _read_tokens(points: list[ReadPoint], selected: Tensor) -> Tensor:
    if len(points) != 1:
        raise RuntimeError(
            f"The token layer ran {len(points)} times in one forward; pass layer= a module that "
            "runs once."
        )
    (value,) = _relevance([points[0].tensor], selected)
    return value.sum(-1) if value.dim() > 2 else value


class AttnLRP(_LRPAttribution):
    r"""AttnLRP (Achtibat et al., ICML 2024): LRP through attention, on the model as it ships.

    The rules of :mod:`captum_chefer.core.lrp` (epsilon rule at linear layers, identity rule at
    norms and activations, uniform rule at the attention matmuls and gates, the softmax rule)
    are applied to what the model runs, on the calling thread, for one forward; the relevance
    is gradient × input through them. The forward value is unchanged, bit for bit.

    Args:
        forward_func: the model, or any callable returning a tensor (or an object with
            ``.logits``).
        model: the module that ``forward_func`` runs, when it is not one (for its
            hand-written activation modules and the token layer).

    Example:
        >>> import torch
        >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        >>> model = torch.nn.Sequential(layer, torch.nn.Flatten(1), torch.nn.Linear(80, 3)).eval()
        >>> x = torch.randn(2, 5, 16)
        >>> relevance = AttnLRP(model).attribute(x, target=0)
        >>> relevance.shape
        torch.Size([2, 5, 16])
    """

    variant: ClassVar[Variant] = "attnlrp"


class CPLRP(_LRPAttribution):
    r"""CP-LRP (Ali et al., ICML 2022): LRP with the attention probabilities held constant.

    As :class:`AttnLRP`, except that no relevance flows through the softmax (attention is a
    constant mixing of the values) and an activated gate is a constant factor. With all biases
    zero the relevance is conserved: it sums to the explained logit.

    Args:
        forward_func: the model, or any callable returning a tensor (or an object with
            ``.logits``).
        model: the module that ``forward_func`` runs, when it is not one.

    Example:
        >>> import torch
        >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        >>> model = torch.nn.Sequential(layer, torch.nn.Flatten(1), torch.nn.Linear(80, 3)).eval()
        >>> x = torch.randn(2, 5, 16)
        >>> CPLRP(model).attribute(x, target=1, output="token", layer=layer).shape
        torch.Size([2, 5])
    """

    variant: ClassVar[Variant] = "cplrp"
