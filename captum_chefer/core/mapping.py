"""The token-to-input mapping: how a relevance row over tokens lands on the model's inputs.

Every attribution class ends here. A row ``(B, N)`` over the tokens a stream attends over is
mapped onto an input of shape

- ids ``(B, T)`` with ``T == N``: the row itself;
- embeddings or region features ``(B, T, D)``: the row broadcast over ``D``;
- images ``(B, C, H, W)``: the prefix tokens (CLS, distillation, registers) dropped, the patches
  laid on their grid (or at the grid cells a model drew for them, ViLT), upsampled bilinearly
  (``align_corners=False``) to ``H × W`` and repeated over ``C``.

A joint sequence of several inputs (ViLT, VisualBERT) is first split back into the segments of
its inputs (:func:`split_segments`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

PatchPositions = tuple[Tensor, tuple[int, int]]
"""``(positions (B, P, 2), grid)``: the grid cell (row, column) of each patch token."""


def find_patch_layout(
    n_tokens: int,
    height: int,
    width: int,
    num_prefix_tokens: int | None = None,
    patch_grid: tuple[int, int] | None = None,
) -> tuple[int, tuple[int, int]] | None:
    """``(prefix tokens, (rows, cols))`` that lay ``n_tokens`` over the image, or None.

    Unless given, the prefix is the smallest count ``k`` for which ``n_tokens − k`` patches of
    one square size tile the ``height × width`` image.

    Example:
        >>> find_patch_layout(198, 224, 224)
        (2, (14, 14))
        >>> find_patch_layout(7, 224, 224, num_prefix_tokens=0) is None
        True
    """
    if patch_grid is not None:
        cells = patch_grid[0] * patch_grid[1]
        prefix = n_tokens - cells if num_prefix_tokens is None else num_prefix_tokens
        return (prefix, patch_grid) if prefix >= 0 and prefix + cells == n_tokens else None
    candidates = [num_prefix_tokens] if num_prefix_tokens is not None else range(min(n_tokens, 33))
    for prefix in candidates:
        grid = _grid_for(n_tokens - prefix, height, width)
        if grid is not None:
            return prefix, grid
    return None


def infer_patch_layout(
    n_tokens: int,
    height: int,
    width: int,
    num_prefix_tokens: int | None = None,
    patch_grid: tuple[int, int] | None = None,
) -> tuple[int, tuple[int, int]]:
    """How many prefix tokens (CLS, distillation, registers) precede a grid of patch tokens.

    As :func:`find_patch_layout`, but a layout that does not fit is an error naming the fix.

    Example:
        >>> infer_patch_layout(198, 224, 224)
        (2, (14, 14))
    """
    layout = find_patch_layout(n_tokens, height, width, num_prefix_tokens, patch_grid)
    if layout is not None:
        return layout
    if patch_grid is not None:
        raise ValueError(
            f"patch_grid={patch_grid} with num_prefix_tokens={num_prefix_tokens} does not match "
            f"the {n_tokens} tokens the model attends over."
        )
    raise ValueError(
        f"Cannot lay {n_tokens} tokens out as prefix tokens plus a patch grid over a "
        f"{height}x{width} image; pass patch_grid=(rows, cols) and num_prefix_tokens=..., "
        "or use output='token' for the raw token relevance."
    )


def prefix_tokens(
    n_tokens: int,
    input_shapes: Sequence[torch.Size],
    num_prefix_tokens: int | None = None,
    patch_grid: tuple[int, int] | None = None,
) -> int:
    """Tokens before the patch grid: as given, else inferred from an image input, else 0.

    An image input whose tokens fit no grid has no patch grid to speak of, so no prefix: 0.

    Example:
        >>> prefix_tokens(17, [torch.Size([1, 3, 32, 32])])
        1
        >>> prefix_tokens(9, [torch.Size([1, 9])])
        0
    """
    if num_prefix_tokens is not None:
        return num_prefix_tokens
    for shape in input_shapes:
        if len(shape) == 4:
            layout = find_patch_layout(n_tokens, shape[-2], shape[-1], None, patch_grid)
            return 0 if layout is None else layout[0]
    return 0


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
    positions: PatchPositions | None = None,
) -> Tensor:
    """Map a token row ``(B, N)`` onto an input of shape ``input_shape`` (see the module).

    ``positions`` places the patches of an image at the grid cells the model drew for them
    (:func:`patches_to_image`); the tokens before them are the prefix.

    An input whose axis 1 has one entry per token (ids ``(B, N)``, embeddings ``(B, N, D)``, or
    per-token features ``(B, N, …)`` of any rank) gets each token's value over that token's
    entries; a 4-D input with another axis 1 is an image, its patches laid on their grid.

    Example:
        >>> tokens_to_input(torch.ones(1, 5), torch.Size([1, 3, 4, 4])).shape
        torch.Size([1, 3, 4, 4])
        >>> tokens_to_input(torch.arange(5.0).view(1, 5), torch.Size([1, 5, 2, 2]))[0, :, 0, 0]
        tensor([0., 1., 2., 3., 4.])
    """
    batch, size = row.shape
    image_hint = positions is not None or num_prefix_tokens is not None or patch_grid is not None
    per_token = len(input_shape) in (2, 3) or not image_hint  # only a 4-D input is an image
    if len(input_shape) >= 2 and input_shape[1] == size and per_token:
        # one value per token along axis 1, spread over the rest (ids, embeddings, or a
        # (B, N, …) input of per-token features, not an image)
        mapped = row.reshape(batch, size, *([1] * (len(input_shape) - 2)))
        return mapped.expand(*input_shape).contiguous()
    if len(input_shape) == 4 and positions is not None:
        patch_index, grid = positions
        prefix = size - patch_index.shape[1]
        return patches_to_image(row[:, prefix:], patch_index, grid, input_shape)
    if len(input_shape) == 4:
        channels, height, width = input_shape[1:]
        prefix, grid = infer_patch_layout(size, height, width, num_prefix_tokens, patch_grid)
        patches = row[:, prefix:].reshape(batch, 1, *grid)
        image = F.interpolate(patches, size=(height, width), mode="bilinear", align_corners=False)
        return image.expand(batch, channels, height, width).contiguous()
    raise ValueError(
        f"Cannot map relevance over {size} tokens onto an input of shape {tuple(input_shape)}; "
        "use output='token' to get the raw token relevance (B, N)."
    )


def patches_to_image(
    row: Tensor, positions: Tensor, grid: tuple[int, int], input_shape: torch.Size
) -> Tensor:
    """Lay patch relevance ``(B, P)`` at ``positions`` ``(B, P, 2)`` (grid row, column).

    For models that reorder or subsample their patches (ViLT draws a random order). Patches
    drawn twice add up; grid cells never drawn get 0. The grid is upsampled as in
    :func:`tokens_to_input`.

    Example:
        >>> row = torch.tensor([[1.0, 2.0]])
        >>> positions = torch.tensor([[[0, 1], [0, 0]]])
        >>> patches_to_image(row, positions, (1, 2), torch.Size([1, 1, 1, 2]))
        tensor([[[[2., 1.]]]])
    """
    batch, channels, height, width = input_shape
    flat = (positions[..., 0] * grid[1] + positions[..., 1]).to(row.device, torch.long)
    cells = torch.zeros(batch, grid[0] * grid[1], device=row.device, dtype=row.dtype)
    cells = cells.scatter_add(1, flat, row).view(batch, 1, *grid)
    image = F.interpolate(cells, size=(height, width), mode="bilinear", align_corners=False)
    return image.expand(batch, channels, height, width).contiguous()


def split_segments(row: Tensor, sizes: Sequence[int]) -> tuple[Tensor, ...]:
    """Split a row over a joint sequence ``(B, N)`` into consecutive segments of ``sizes``.

    Example:
        >>> split_segments(torch.arange(5.0)[None], [2, 3])
        (tensor([[0., 1.]]), tensor([[2., 3., 4.]]))
    """
    if sum(sizes) != row.shape[1]:
        raise ValueError(
            f"The joint sequence has {row.shape[1]} tokens but the segments {list(sizes)} add up "
            f"to {sum(sizes)}; pass segments=(tokens of each input, in order)."
        )
    return tuple(row.split(list(sizes), dim=1))


def segment_sizes(input_shapes: Sequence[torch.Size], n_tokens: int) -> list[int]:
    """Tokens of each input in a joint sequence: ``T`` for ids or embeddings ``(B, T[, D])``;
    a single image input takes the rest (its prefix tokens and its patches).

    Example:
        >>> segment_sizes([torch.Size([2, 5]), torch.Size([2, 3, 32, 32])], 22)
        [5, 17]
    """
    images = [i for i, shape in enumerate(input_shapes) if len(shape) == 4]
    if len(images) > 1:
        raise ValueError("Several image inputs: pass segments=(tokens of each input, in order).")
    sizes = [shape[1] if len(shape) in (2, 3) else 0 for shape in input_shapes]
    if images:
        sizes[images[0]] = n_tokens - sum(sizes)
    return sizes
