"""Which token row to read, and how a token row maps back onto the model's inputs."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

TokenIndex = int | str | Tensor
SelfRelevance = Literal["subtract", "zero", "keep"]


def token_start_rows(token_index: TokenIndex, valid: Tensor, causal: bool | Tensor) -> Tensor:
    """The rows of ``R`` to read, as weights ``(B, N)`` over tokens.

    Args:
        token_index: ``"auto"`` (the last valid token when the attention is causal, else the
            first valid token), ``"mean"`` (the mean of the valid tokens' rows, for mean-pooled
            models), an int (negative counts from the end), or a LongTensor ``(B,)``.
        valid: bool ``(B, N)``, False at padding.
        causal: whether the model's attention is causal (a bool, or a 0-dim bool tensor so
            that no device sync is needed).

    Example:
        >>> valid = torch.tensor([[True, True, False]])
        >>> token_start_rows("auto", valid, causal=True)
        tensor([[0., 1., 0.]])
        >>> token_start_rows("mean", valid, causal=False)
        tensor([[0.5000, 0.5000, 0.0000]])
    """
    batch, size = valid.shape
    _check_has_real_tokens(valid)
    positions = torch.arange(size, device=valid.device).expand(batch, size)
    if isinstance(token_index, str):
        if token_index == "mean":
            weights = valid.float()
            return weights / weights.sum(1, keepdim=True)
        if token_index != "auto":
            raise ValueError(
                f"token_index={token_index!r} is not understood; use 'auto', 'mean', an int, "
                "or a LongTensor with one index per example."
            )
        last = torch.where(valid, positions, -1).amax(1)
        first = torch.where(valid, positions, size).amin(1)
        index = torch.where(torch.as_tensor(causal, device=valid.device), last, first)
    elif isinstance(token_index, Tensor):
        index = token_index.to(device=valid.device, dtype=torch.long).reshape(-1)
        if index.numel() == 1:
            index = index.expand(batch)
        if index.numel() != batch:
            raise ValueError(
                f"token_index has {index.numel()} entries for a batch of {batch}; "
                "give one index per example."
            )
    elif isinstance(token_index, int):
        index = torch.full((batch,), token_index, device=valid.device, dtype=torch.long)
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
    _check_reads_real_tokens(rows, valid, token_index)
    return rows


def _check_has_real_tokens(valid: Tensor) -> None:
    """Refuse an example with no real token."""
    empty = ~valid.any(1)
    if bool(empty.any()):
        examples = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"Examples {examples} have no real token (all padding in the attention mask), so "
            "they have no relevance to explain; remove them from the batch."
        )


def _check_reads_real_tokens(rows: Tensor, valid: Tensor, token_index: TokenIndex) -> None:
    """Refuse a read row that is padding."""
    if bool(((rows > 0) & ~valid).any()):
        raise ValueError(
            f"token_index={token_index!r} reads a padding position in some examples; read a "
            "real token (token_index='auto' picks the first, or the last for causal models)."
        )


def apply_self_relevance(added: Tensor, start: Tensor, self_relevance: SelfRelevance) -> Tensor:
    """The relevance row, given what attention ``added`` to the ``start`` rows.

    ``R = I + …`` gives the read token at least 1 from the identity alone, which dwarfs every
    other entry in a picture. ``"subtract"`` drops exactly that identity share and keeps what
    attention added; it also works for ``token_index="mean"``. ``"zero"`` sets the read tokens
    to 0, as Chefer et al.'s code does. ``"keep"`` returns the raw row ``start + added``.

    Example:
        >>> apply_self_relevance(torch.tensor([[0.5, 0.2]]), torch.tensor([[1.0, 0.0]]), "zero")
        tensor([[0.0000, 0.2000]])
    """
    if self_relevance == "subtract":
        return added
    if self_relevance == "keep":
        return start + added
    if self_relevance == "zero":
        return (start + added).masked_fill(start > 0, 0.0)
    raise ValueError(f"self_relevance must be 'subtract', 'zero' or 'keep', not {self_relevance!r}")


def infer_patch_layout(
    n_tokens: int,
    height: int,
    width: int,
    num_prefix_tokens: int | None = None,
    patch_grid: tuple[int, int] | None = None,
) -> tuple[int, tuple[int, int]]:
    """How many prefix tokens (CLS, distillation, registers) precede a grid of patch tokens.

    Unless given, the prefix is the smallest count ``k`` for which ``n_tokens − k`` patches of
    one square size tile the ``height × width`` image.

    Example:
        >>> infer_patch_layout(198, 224, 224)
        (2, (14, 14))
    """
    if patch_grid is not None:
        prefix = (
            n_tokens - patch_grid[0] * patch_grid[1]
            if num_prefix_tokens is None
            else num_prefix_tokens
        )
        if prefix < 0 or prefix + patch_grid[0] * patch_grid[1] != n_tokens:
            raise ValueError(
                f"patch_grid={patch_grid} with num_prefix_tokens={prefix} does not match the "
                f"{n_tokens} tokens the model attends over."
            )
        return prefix, patch_grid
    candidates = [num_prefix_tokens] if num_prefix_tokens is not None else range(min(n_tokens, 33))
    for prefix in candidates:
        grid = _grid_for(n_tokens - prefix, height, width)
        if grid is not None:
            return prefix, grid
    raise ValueError(
        f"Cannot lay {n_tokens} tokens out as prefix tokens plus a patch grid over a "
        f"{height}x{width} image; pass patch_grid=(rows, cols) and num_prefix_tokens=..., "
        "or use output='token' for the raw token relevance."
    )


def _grid_for(n_patches: int, height: int, width: int) -> tuple[int, int] | None:
    if n_patches <= 0:
        return None
    patch = math.isqrt(height * width // n_patches) if height * width % n_patches == 0 else 0
    if patch and patch * patch * n_patches == height * width and height % patch == 0:
        return height // patch, width // patch
    return None


def tokens_to_input(
    row: Tensor,
    input_shape: torch.Size,
    num_prefix_tokens: int | None = None,
    patch_grid: tuple[int, int] | None = None,
) -> Tensor:
    """Map a token row ``(B, N)`` onto an input of shape ``input_shape``.

    - ids ``(B, T)`` with ``T == N``: the row itself;
    - embeddings ``(B, T, D)``: the row broadcast over ``D``;
    - images ``(B, C, H, W)``: prefix tokens dropped, patches laid on their grid, upsampled
      bilinearly (``align_corners=False``) to ``H × W`` and repeated over ``C``.

    Example:
        >>> tokens_to_input(torch.ones(1, 5), torch.Size([1, 3, 4, 4])).shape
        torch.Size([1, 3, 4, 4])
    """
    batch, size = row.shape
    if len(input_shape) == 4:
        channels, height, width = input_shape[1:]
        prefix, grid = infer_patch_layout(size, height, width, num_prefix_tokens, patch_grid)
        patches = row[:, prefix:].reshape(batch, 1, *grid)
        image = F.interpolate(patches, size=(height, width), mode="bilinear", align_corners=False)
        return image.expand(batch, channels, height, width).contiguous()
    if len(input_shape) in (2, 3) and input_shape[1] == size:
        mapped = row if len(input_shape) == 2 else row.unsqueeze(-1)
        return mapped.expand(*input_shape).contiguous()
    raise ValueError(
        f"Cannot map relevance over {size} tokens onto an input of shape {tuple(input_shape)}; "
        "use output='token' to get the raw token relevance (B, N)."
    )
