"""``CheferSingleStream``: the self-attention rule over a joint text-and-image sequence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..core.readers import CheferRowReader
from ..core.tokens import SelfRelevance, TokenIndex
from ._captum import TargetType, log_usage
from .engine import Output, Read, ReadSpec
from .multimodal import CheferMultiModal


class CheferSingleStream(CheferMultiModal):
    r"""Single-stream models (ViLT, VisualBERT): the self-attention rule over the joint sequence.

    ``R = (I + Abar_L)…(I + Abar_1)`` over the concatenated text and image tokens (ICCV 2021 eq.
    6); the row of ``token_index`` (default: the rows the output is computed from, seen in the
    backward: the text CLS both models pool from) is split back per input: the first
    ``segments[0]`` tokens belong to ``inputs[0]``, and so on. By default an ids or embeddings
    input ``(B, T[, D])`` takes ``T`` tokens and a single image input takes the rest: its prefix
    tokens (ViLT's image CLS) and its patches, laid on their grid. ViLT draws a random order of
    the patches in every forward; the order drawn is recorded during the call (a position route
    of :mod:`captum_chefer.families.positions`: its ``visual_embed`` is wrapped on this thread,
    then restored) so that each patch lands in its own cell.

    ``output="token"`` returns the segments in the model's token order.

    Example:
        >>> import torch
        >>> from transformers import VisualBertConfig, VisualBertModel
        >>> _ = torch.manual_seed(0)
        >>> config = VisualBertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=32, visual_embedding_dim=8)
        >>> model = VisualBertModel(config).eval()
        >>> forward = lambda ids, regions: model(input_ids=ids, visual_embeds=regions).pooler_output
        >>> ids, regions = torch.randint(4, 50, (2, 5)), torch.randn(2, 3, 8)
        >>> text, boxes = CheferSingleStream(forward, model).attribute((ids, regions), target=0)
        >>> text.shape, boxes.shape
        (torch.Size([2, 5]), torch.Size([2, 3, 8]))
    """

    family_name = "single-stream"

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        token_index: TokenIndex = "auto",
        self_relevance: SelfRelevance = "subtract",
        output: Output = "input",
        segments: Sequence[int] | None = None,
        block_bytes: int | None = None,
        num_prefix_tokens: int | None = None,
        patch_grid: tuple[int, int] | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        r"""Relevance of each input's tokens for ``target``.

        Args:
            inputs: the model's inputs in the order their tokens appear in the joint sequence,
                e.g. ``(input_ids, pixel_values)`` for ViLT, ``(input_ids, visual_embeds)`` for
                VisualBERT.
            segments: tokens of each input in the joint sequence; inferred when None.
            token_index, self_relevance, output, block_bytes, num_prefix_tokens, patch_grid:
                as in :meth:`CheferMultiModal.attribute`.

        Returns:
            One relevance per input, shaped like it (a tuple for a tuple).
        """
        read = Read(self.read_stream, self.read_stream, token_index)
        spec = ReadSpec(
            (read,),
            self_relevance,
            output,
            num_prefix_tokens,
            patch_grid,
            joint=True,
            segments=segments,
        )
        return self._explain(
            CheferRowReader(),
            spec,
            inputs,
            target,
            additional_forward_args,
            block_bytes,
            self.streams,
        )
