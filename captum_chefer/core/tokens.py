"""Which rows of ``R`` to read, and what to do with the read tokens' identity share.

Which rows the explained output is computed from is read off the gradient (see
:mod:`captum_chefer.attr.reads`): :func:`rows_with_gradient` gives the query rows of an attention
call that get a gradient, :func:`mean_of_rows` and :func:`one_hot_rows` turn rows into weights,
and :func:`row_projections` with :func:`equal_rows` tell whether the output weighs those rows
alike (a mean pooling) from the gradient of the tokens' final states.

Names used throughout: ``real`` is the bool mask ``(B, N)`` of real tokens (False at padding);
*row weights* ``(B, N)`` are the rows of ``R`` read, one-hot or uniform over several rows;
``self_relevance`` is what happens to the read tokens' identity share (not to be confused with
``R_xx``, the relevance of a stream to itself, :mod:`~captum_chefer.core.bimodal`). How a row
then lands on the inputs is :mod:`~captum_chefer.core.mapping`.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

TokenIndex = int | str | Tensor
SelfRelevance = Literal["subtract", "zero", "keep"]


def row_weights(token_index: TokenIndex, real: Tensor, causal: bool | Tensor) -> Tensor:
    """The rows of ``R`` to read, as weights ``(B, N)`` over tokens.

    Args:
        token_index: ``"auto"`` (the last real token when the attention is causal, else the
            first real token), ``"mean"`` (the mean of the real tokens' rows, for mean-pooled
            models), an int (negative counts from the end), or a LongTensor ``(B,)``.
        real: bool ``(B, N)``, False at padding.
        causal: whether the model's attention is causal (a bool, or a 0-dim bool tensor so
            that no device sync is needed).

    Example:
        >>> real = torch.tensor([[True, True, False]])
        >>> row_weights("auto", real, causal=True)
        tensor([[0., 1., 0.]])
        >>> row_weights("mean", real, causal=False)
        tensor([[0.5000, 0.5000, 0.0000]])
    """
    batch, size = real.shape
    _check_has_real_tokens(real)
    positions = torch.arange(size, device=real.device).expand(batch, size)
    if isinstance(token_index, str):
        if token_index == "mean":
            weights = real.float()
            return weights / weights.sum(1, keepdim=True)
        if token_index != "auto":
            raise ValueError(
                f"token_index={token_index!r} is not understood; use 'auto', 'mean', an int, "
                "or a LongTensor with one index per example."
            )
        last = torch.where(real, positions, -1).amax(1)
        first = torch.where(real, positions, size).amin(1)
        index = torch.where(torch.as_tensor(causal, device=real.device), last, first)
    elif isinstance(token_index, Tensor):
        index = per_example(token_index.to(real.device), batch, TOO_FEW_INDEXES)
    elif isinstance(token_index, int):
        index = torch.full((batch,), token_index, device=real.device, dtype=torch.long)
    else:
        raise TypeError(
            f"token_index must be 'auto', 'mean', an int or a LongTensor, not {token_index!r}"
        )
    if bool(((index < -size) | (index >= size)).any()):
        raise IndexError(
            f"token_index={token_index!r} is outside the {size} tokens the model attends over; "
            f"pass an index in [-{size}, {size})."
        )
    index = torch.where(index < 0, index + size, index)
    rows = F.one_hot(index, size).float()
    _check_reads_real_tokens(rows, real, token_index)
    return rows


def rows_with_gradient(grad: Tensor) -> Tensor:
    """Bool ``(B, N)``: the query rows of one attention call whose gradient is not zero.

    Args:
        grad: ``dO`` ``(B, H, N, Dv)`` of a kernel call, or ``dA`` ``(B, H, N, Nk)``.

    Example:
        >>> grad = torch.zeros(1, 2, 3, 4)
        >>> grad[0, 1, 2, 0] = 0.5
        >>> rows_with_gradient(grad)
        tensor([[False, False,  True]])
    """
    return torch.linalg.vector_norm(grad, dim=(1, 3)) > 0


def mean_of_rows(rows: Tensor) -> Tensor:
    """Row weights ``(B, N)`` uniform over ``rows`` (bool ``(B, N)``); 0 where an example has none.

    Example:
        >>> mean_of_rows(torch.tensor([[True, False, True], [False, False, False]]))
        tensor([[0.5000, 0.0000, 0.5000],
                [0.0000, 0.0000, 0.0000]])
    """
    weights = rows.float()
    return weights / weights.sum(1, keepdim=True).clamp(min=1.0)


def one_hot_rows(token_index: int | Tensor, batch: int, size: int, device: torch.device) -> Tensor:
    """Row weights ``(B, N)``, one-hot at ``token_index`` (an int, negative from the end, or a
    LongTensor ``(B,)``); an index outside ``[-N, N)`` gives a zero row (the caller refuses it).

    Example:
        >>> one_hot_rows(torch.tensor([0, -1]), 2, 3, torch.device("cpu"))
        tensor([[1., 0., 0.],
                [0., 0., 1.]])
    """
    if isinstance(token_index, Tensor):
        index = per_example(token_index.to(device), batch, TOO_FEW_INDEXES)
    else:
        index = torch.full((batch,), int(token_index), device=device, dtype=torch.long)
    index = torch.where(index < 0, index + size, index)
    positions = torch.arange(size, device=device)
    return (positions[None, :] == index[:, None]).float()


def index_in_range(token_index: int | Tensor, batch: int, size: int) -> Tensor | bool:
    """Whether each example's ``token_index`` lies in ``[-N, N)``: a bool for an int, a bool
    tensor ``(B,)`` for a LongTensor (checked on its device, without a sync).

    Example:
        >>> index_in_range(3, 2, 3), index_in_range(torch.tensor([0, -4]), 2, 3)
        (False, tensor([ True, False]))
    """
    if isinstance(token_index, Tensor):
        index = per_example(token_index, batch, TOO_FEW_INDEXES)
        return (index >= -size) & (index < size)
    return -size <= int(token_index) < size


def row_projections(grad: Tensor, chunk_bytes: int = 64 * 2**20) -> tuple[Tensor, Tensor]:
    """Each row's norm and its projection on a fixed pseudo-random unit direction, ``(B, N)``
    float32 each, from a gradient ``(B, N, ...)`` over the tokens.

    Two rows with the same gradient have the same projection; two different ones almost surely
    not (their projections differ by about ``‖g_i − g_j‖ / √F`` for ``F`` features, far above
    float32 rounding). The direction is made on the gradient's device, so nothing is copied
    from the host; the projection runs in float32, ``chunk_bytes`` of rows at a time.

    Example:
        >>> grad = torch.tensor([[[1.0, 2.0], [1.0, 2.0], [2.0, 1.0]]])
        >>> _, p = row_projections(grad)
        >>> bool(p[0, 0] == p[0, 1]), bool(p[0, 0] == p[0, 2])
        (True, False)
    """
    flat = grad.reshape(grad.shape[0], grad.shape[1], -1)
    direction = _direction(flat.shape[-1], flat.device)
    norms = torch.linalg.vector_norm(flat, dim=-1, dtype=torch.float32)
    step = max(1, chunk_bytes // max(1, 4 * flat.shape[0] * flat.shape[2]))
    projections = torch.cat(
        [
            torch.matmul(flat[:, start : start + step].float(), direction)
            for start in range(0, flat.shape[1], step)
        ],
        dim=1,
    )
    return norms, projections


def _direction(size: int, device: torch.device) -> Tensor:
    """A fixed pseudo-random unit vector ``(size,)`` in float32."""
    positions = torch.arange(size, device=device, dtype=torch.float32)
    vector = torch.frac(torch.sin(positions * 12.9898 + 78.233).abs() * 43758.5453) - 0.5
    return vector / torch.linalg.vector_norm(vector)


def equal_rows(rows: Tensor, norms: Tensor, projections: Tensor, relative: float = 1e-5) -> Tensor:
    """Bool ``(B,)``: whether the gradient rows ``rows`` are all alike and no other row has one.

    ``norms`` and ``projections`` come from :func:`row_projections`; projections of equal rows
    may differ by rounding, which ``relative`` bounds relative to the largest row norm. An
    example with one row (or none) passes.

    Example:
        >>> grad = torch.tensor([[[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]]])
        >>> equal_rows(torch.tensor([[True, True, False]]), *row_projections(grad))
        tensor([True])
    """
    inside = torch.where(rows, projections, float("nan"))
    spread = inside.nan_to_num(float("-inf")).amax(1) - inside.nan_to_num(float("inf")).amin(1)
    alike = spread <= relative * norms.amax(1)
    return ((norms > 0) == rows).all(1) & (alike | (rows.sum(1) <= 1))


TOO_FEW_INDEXES = "token_index has {n} entries for a batch of {batch}; give one index per example."


def per_example(index: Tensor | int | list[int], batch: int, error: str) -> Tensor:
    """``index`` as a LongTensor ``(batch,)``: one per example, or one for all.

    ``error`` is formatted with ``n`` (entries given) and ``batch`` when the count is wrong.

    Example:
        >>> per_example(3, 2, "{n} for {batch}")
        tensor([3, 3])
    """
    flat = torch.as_tensor(index, dtype=torch.long).reshape(-1)
    if flat.numel() == 1:
        flat = flat.expand(batch)
    if flat.numel() != batch:
        raise ValueError(error.format(n=flat.numel(), batch=batch))
    return flat


def _check_has_real_tokens(real: Tensor) -> None:
    """Refuse an example with no real token."""
    empty = ~real.any(1)
    if bool(empty.any()):
        examples = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"Examples {examples} have no real token (all padding in the attention mask), so "
            "they have no relevance to explain; remove them from the batch."
        )


def _check_reads_real_tokens(rows: Tensor, real: Tensor, token_index: TokenIndex) -> None:
    """Refuse a read row that is padding."""
    if bool(((rows > 0) & ~real).any()):
        raise ValueError(
            f"token_index={token_index!r} reads a padding position in some examples; read a "
            "real token (token_index='auto' picks the first, or the last for causal models)."
        )


def apply_self_relevance(added: Tensor, weights: Tensor, self_relevance: SelfRelevance) -> Tensor:
    """The relevance row, given what attention ``added`` to the rows of ``weights``.

    ``R = I + …`` gives the read token at least 1 from the identity alone, which dwarfs every
    other entry in a picture. ``"subtract"`` drops exactly that identity share and keeps what
    attention added; it also works for ``token_index="mean"``. ``"zero"`` sets the read tokens
    to 0, as Chefer et al.'s code does. ``"keep"`` returns the raw row ``weights + added``.

    Example:
        >>> apply_self_relevance(torch.tensor([[0.5, 0.2]]), torch.tensor([[1.0, 0.0]]), "zero")
        tensor([[0.0000, 0.2000]])
    """
    if self_relevance == "subtract":
        return added
    if self_relevance == "keep":
        return weights + added
    if self_relevance == "zero":
        return (weights + added).masked_fill(weights > 0, 0.0)
    raise ValueError(f"self_relevance must be 'subtract', 'zero' or 'keep', not {self_relevance!r}")


def token_start_rows(token_index: TokenIndex, valid: Tensor, causal: bool | Tensor) -> Tensor:
    """Deprecated name of :func:`row_weights`."""
    warnings.warn(
        "token_start_rows is deprecated; use captum_chefer.core.row_weights (the same function).",
        DeprecationWarning,
        stacklevel=2,
    )
    return row_weights(token_index, valid, causal)


def mask_read_tokens(row: Tensor, weights: Tensor, self_relevance: SelfRelevance) -> Tensor:
    """Handle the read tokens of a row that has no identity term (attention, rollout).

    ``"zero"`` sets the read tokens to 0, as the papers' code drops the CLS column;
    ``"keep"`` returns the row unchanged. ``"subtract"`` only exists for Chefer's
    ``R = I + …``, whose identity share is known exactly.

    Example:
        >>> mask_read_tokens(torch.tensor([[0.6, 0.4]]), torch.tensor([[1.0, 0.0]]), "zero")
        tensor([[0.0000, 0.4000]])
    """
    if self_relevance == "keep":
        return row
    if self_relevance == "zero":
        return row.masked_fill(weights > 0, 0.0)
    raise ValueError(
        f"self_relevance={self_relevance!r} is not available here: 'subtract' removes the "
        "identity of Chefer's R = I + ..., which attention and rollout rows do not have; "
        "use 'zero' (the read token set to 0) or 'keep'."
    )


def check_something_left(weights: Tensor, real: Tensor, self_relevance: SelfRelevance) -> None:
    """Refuse ``self_relevance="zero"`` where it would zero every real token of an example."""
    if self_relevance == "zero" and bool(((weights > 0) | ~real).all(1).any()):
        raise ValueError(
            "self_relevance='zero' zeroes the read token, and in some examples it is the only "
            "real token, so their map would be all zeros; pass self_relevance='keep' or "
            "'subtract', or explain a longer input."
        )
