"""Token rows ready to draw: padding cut, special tokens masked, word pieces merged, one scale.

Chefer's relevance is tiny (about 1e-4 for a pretrained BERT) and its size differs between
examples, so a picture must say which scale it uses. :func:`token_rows` cuts each example to
its real tokens, :func:`merge_word_pieces` joins ``"windows", "##ill"`` into ``"windowsill"``
(summing the pieces' relevance, which is additive), and :func:`row_scales` gives the number that
maps to full colour: one shared value for all rows (so rows can be compared) or each row's own
maximum. Only torch is imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Scale = Literal["shared", "row"] | float
"""``"shared"``: one scale for all rows; ``"row"``: each row's own ``max |score|``; a number."""


@dataclass(frozen=True)
class TokenRow:
    """One example's tokens and raw relevance, ready to draw.

    Attributes:
        tokens: the ``T`` shown tokens (no padding).
        scores: ``(T,)`` raw relevance, float64 on the CPU.
        special: ``T`` flags, True at tokens that are shown but not coloured ([CLS], [SEP]).
    """

    tokens: list[str]
    scores: Tensor
    special: list[bool]

    def shown(self) -> Tensor:
        """``scores`` with the special tokens set to 0."""
        return self.scores.masked_fill(torch.tensor(self.special, dtype=torch.bool), 0.0)


def token_rows(
    relevance: Tensor,
    tokens: Sequence[Sequence[str]],
    *,
    special_mask: Tensor | None = None,
    merge_word_pieces: bool = False,
    prefix: str = "##",
) -> list[TokenRow]:
    """Cut a batch of token relevance to each example's tokens, optionally merging word pieces.

    Args:
        relevance: ``(B, T)`` token relevance, e.g. ``CheferRelevance(...).attribute(ids, ...)``.
        tokens: ``B`` token lists; row ``i`` shows ``len(tokens[i])`` tokens, so pass the real
            tokens only (``tokenizer.convert_ids_to_tokens(ids[i, :length])``) to drop padding.
        special_mask: ``(B, T)`` bool, True at tokens not to colour (``torch.isin(ids,
            torch.tensor(tokenizer.all_special_ids))``). None: every token is coloured.
        merge_word_pieces: join continuation pieces (starting with ``prefix``) to the piece
            before them, summing their relevance.
        prefix: the continuation marker of the tokenizer (``"##"`` for BERT WordPiece).

    Returns:
        One :class:`TokenRow` per example.

    Example:
        >>> relevance = torch.tensor([[0.0, 2e-4, 1e-4, 3e-4, 0.0]])
        >>> rows = token_rows(
        ...     relevance,
        ...     [["[CLS]", "warm", "windows", "##ill", "[SEP]"]],
        ...     special_mask=torch.tensor([[True, False, False, False, True]]),
        ...     merge_word_pieces=True,
        ... )
        >>> rows[0].tokens, [round(v, 6) for v in rows[0].scores.tolist()], rows[0].special
        (['[CLS]', 'warm', 'windowsill', '[SEP]'], [0.0, 0.0002, 0.0004, 0.0], [True, False, False, True])
    """  # noqa: E501
    if relevance.dim() != 2 or relevance.shape[0] != len(tokens):
        raise ValueError(
            f"relevance must be (B, T) with one row per token list; got {tuple(relevance.shape)} "
            f"for {len(tokens)} token lists. For one sentence pass relevance[None] and [tokens]."
        )
    rows = []
    for i, row_tokens in enumerate(tokens):
        rows.append(_one_row(relevance, special_mask, i, list(row_tokens)))
    if merge_word_pieces:
        rows = [merge_pieces(row, prefix) for row in rows]
    return rows


def _one_row(relevance: Tensor, special_mask: Tensor | None, i: int, tokens: list[str]) -> TokenRow:
    length = len(tokens)
    if length > relevance.shape[1]:
        raise ValueError(
            f"row {i} has {length} tokens but the relevance only {relevance.shape[1]} positions."
        )
    scores = relevance[i, :length].detach().to("cpu", torch.float64)
    if not torch.isfinite(scores).all():
        raise ValueError(f"row {i} of the relevance holds NaN or infinity; nothing to draw.")
    special = [False] * length if special_mask is None else special_mask[i, :length].tolist()
    return TokenRow(tokens, scores, [bool(s) for s in special])


def merge_pieces(row: TokenRow, prefix: str = "##") -> TokenRow:
    """Join each continuation piece (``prefix``-marked) to the word before it; relevance adds up.

    Example:
        >>> row = TokenRow(["the", "windows", "##ill"], torch.tensor([1.0, 2.0, 0.5]), [False] * 3)
        >>> merged = merge_pieces(row)
        >>> merged.tokens, merged.scores.tolist()
        (['the', 'windowsill'], [1.0, 2.5])
    """
    tokens: list[str] = []
    scores: list[Tensor] = []
    special: list[bool] = []
    for token, score, is_special in zip(row.tokens, row.scores, row.special, strict=True):
        if token.startswith(prefix) and tokens and not special[-1] and not is_special:
            tokens[-1] += token[len(prefix) :]
            scores[-1] = scores[-1] + score
        else:
            tokens.append(token)
            scores.append(score)
            special.append(is_special)
    return TokenRow(tokens, torch.stack(scores) if scores else row.scores[:0], special)


def row_scales(rows: Sequence[TokenRow], scale: Scale = "shared") -> list[float]:
    """The value that maps to full colour for each row (special tokens are not counted).

    Raises:
        ValueError: when a scale would be 0 (every coloured score is 0) or is not positive.

    Example:
        >>> rows = [TokenRow(["a"], torch.tensor([2.0]), [False]),
        ...         TokenRow(["b"], torch.tensor([-0.5]), [False])]
        >>> row_scales(rows), row_scales(rows, "row"), row_scales(rows, 4.0)
        ([2.0, 2.0], [2.0, 0.5], [4.0, 4.0])
    """
    if isinstance(scale, str):
        if scale not in ("shared", "row"):
            raise ValueError(f"scale must be 'shared', 'row' or a positive number, not {scale!r}.")
        maxima = [float(row.shown().abs().max()) if row.tokens else 0.0 for row in rows]
        values = [max(maxima, default=0.0)] * len(rows) if scale == "shared" else maxima
    else:
        values = [float(scale)] * len(rows)
    if any(not value > 0 for value in values):
        raise ValueError(
            "a colour scale is 0 or negative: every coloured score of a row is 0, or the given "
            "scale is not positive. Check the target and token_index, or pass scale='row'/'shared'."
        )
    return values


def normalised(rows: Sequence[TokenRow], scale: Scale = "shared") -> list[Tensor]:
    """Each row's scores divided by its scale (:func:`row_scales`), special tokens set to 0.

    The values lie in ``[-1, 1]``, the range Captum's text visualisation expects.

    Example:
        >>> rows = [TokenRow(["[CLS]", "a", "b"], torch.tensor([9.0, 1e-4, -2e-4]),
        ...                  [True, False, False])]
        >>> normalised(rows)[0].tolist()
        [0.0, 0.5, -1.0]
    """
    return [row.shown() / s for row, s in zip(rows, row_scales(rows, scale), strict=True)]
