"""``CheferRelevance``: gradient-weighted attention relevance as a Captum attribution."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from ..core import CheferMatrixReader, CheferRowReader
from ..core.tokens import SelfRelevance, TokenIndex
from ._captum import TargetType, log_usage
from .base import AttentionAttribution
from .engine import Output, Read, ReadSpec


class CheferRelevance(AttentionAttribution):
    r"""Chefer, Gur & Wolf (ICCV 2021), "Generic Attention-model Explainability", eq. 5-6.

    For each attention layer ``l`` in forward order, ``Abar_l = mean_h(clamp(dA_l ⊙ A_l, 0))``
    where ``A_l`` is the post-softmax attention ``(B, H, N, N)`` and ``dA_l`` the gradient of the
    selected (pre-softmax) output. From ``R = I``, ``R ← R + Abar_l·R``; the relevance is the row
    of ``R`` for the token the prediction is read from.

    The model runs exactly as it was loaded: fused SDPA attention or an explicit softmax
    (Hugging Face at ``sdpa`` or ``eager``, timm, ``nn.MultiheadAttention``, custom code), seen
    on the calling thread only; custom code may also call :func:`mark_attention`. Nothing on the
    model is switched or left changed. Attention the rule does not define (windows, channel or
    class attention, a siamese forward) is refused with the cause. On the fused path only the
    needed row is formed, folded in as the gradients of each layer arrive, from attention
    recomputed a block of query rows at a time.

    Args:
        forward_func: the model, or any callable returning a tensor (or an object with
            ``.logits``).
        model: the module whose attention is explained, when ``forward_func`` is not one.

    Example:
        >>> import torch
        >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        >>> encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
        >>> head = torch.nn.Linear(16, 3)
        >>> model = lambda x: head(encoder(x)[:, 0])  # a classifier on the first token
        >>> x = torch.randn(2, 5, 16)
        >>> relevance = CheferRelevance(model, encoder).attribute(x, target=0)
        >>> relevance.shape
        torch.Size([2, 5, 16])
    """

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        token_index: TokenIndex = "auto",
        output: Output = "input",
        self_relevance: SelfRelevance = "subtract",
        start_layer: int = 0,
        mode: Literal["row", "matrix"] = "row",
        block_bytes: int | None = None,
        num_prefix_tokens: int | None = None,
        patch_grid: tuple[int, int] | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        r"""Relevance of each input position for ``target``.

        Args:
            inputs: a tensor or tuple of tensors, passed first to ``forward_func``: token ids
                ``(B, T)``, embeddings ``(B, T, D)`` or images ``(B, C, H, W)``.
            target: Captum's target: an int, a tuple, a tensor, or one per example. None on a
                multi-class output explains the predicted class; on one value per example,
                that value.
            additional_forward_args: passed positionally after ``inputs``.
            token_index: the rows to read: ``"auto"`` (the rows the explained output is
                computed from, seen in the backward: one token, or the mean of tokens the
                output weighs alike; see :mod:`captum_chefer.attr.reads`), ``"mean"`` (the mean
                of those rows), an int, or a LongTensor ``(B,)``. Where the model's layers
                form independent towers (one per input feature), each input is read through
                the tower it feeds.
            output: ``"input"`` maps the row onto each input's shape; ``"token"`` returns the
                raw row ``(B, N)`` over every attended token.
            self_relevance: the read token gets ``≥ 1`` from the identity in ``R = I + …``,
                which dwarfs the rest. ``"subtract"`` (default) removes exactly that identity
                share and keeps what attention added, which also works for ``"mean"``;
                ``"zero"`` zeroes the read tokens as Chefer et al.'s code does (an error with
                ``token_index="mean"``, where every real token is read); ``"keep"`` returns the
                raw row.
            start_layer: skip attention layers below this index (Chefer's ViT scripts use 1);
                ``0 <= start_layer < number of layers``.
            mode: ``"row"`` folds one row in during the backward pass (``O(B·N)`` memory);
                ``"matrix"`` keeps each layer's ``(B, N, N)`` map and forms the full ``R``.
                Both give the same result.
            block_bytes: memory for one block of recomputed attention ``(B, H, rows, N)``;
                by default the device's entry of ``DEFAULT_BLOCK_BYTES`` in
                :mod:`captum_chefer.core.attention` (cache-sized on CPU, larger on GPU).
                Inputs are processed a block of query rows at a time, so memory does not
                grow with ``N²·H``.
            num_prefix_tokens: tokens before the patch grid (CLS, distillation, registers);
                inferred from the image size when None.
            patch_grid: ``(rows, cols)`` of patches; inferred when None.

        Returns:
            Relevance shaped like ``inputs`` (a tuple for a tuple), or ``(B, N)`` with
            ``output="token"``. Padding tokens get exactly 0.
        """
        if mode not in ("row", "matrix"):
            raise ValueError(f"mode must be 'row' or 'matrix', not {mode!r}")
        reader = CheferRowReader(start_layer) if mode == "row" else CheferMatrixReader(start_layer)
        spec = ReadSpec(
            (Read("tokens", "tokens", token_index),),
            self_relevance,
            output,
            num_prefix_tokens,
            patch_grid,
            one_token_row=True,
        )
        return self._explain(reader, spec, inputs, target, additional_forward_args, block_bytes)
