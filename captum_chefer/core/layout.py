"""Relevance over a joint token sequence, split back onto the inputs it came from."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


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


def patches_to_image(
    row: Tensor, positions: Tensor, grid: tuple[int, int], input_shape: torch.Size
) -> Tensor:
    """Lay patch relevance ``(B, P)`` at ``positions`` ``(B, P, 2)`` (grid row, column).

    For models that reorder or subsample their patches (ViLT draws a random order). Patches
    drawn twice add up; grid cells never drawn get 0. The grid is upsampled bilinearly
    (``align_corners=False``) to the image size and repeated over channels, as in
    :func:`~captum_chefer.core.tokens.tokens_to_input`.

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
