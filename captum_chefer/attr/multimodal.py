"""Chefer et al.'s multi-stream rules (ICCV 2021, eq. 6-11) as Captum attributions.

One forward with attention captured and every call tagged with the module that made it, one
backward from the selected output; the calls are sorted into streams by the family's
:class:`~captum_chefer.families.StreamMap`, each call's ``Abar`` (eq. 5) is kept, and the maps
``R_xy`` are updated in forward order (:class:`~captum_chefer.core.bimodal.MultiStreamReader`).
The relevance of an input is a row of ``R_{read, x}``, where ``read`` is the stream the
prediction is read from and ``x`` the input's stream. The flow is the one every class runs
(:mod:`~captum_chefer.attr.engine`); the families are the table of
:mod:`captum_chefer.families.table`.

- :class:`CheferMultiModal`: any family of the table (BLIP image-text matching, or one given).
- :class:`CheferEncoderDecoder` (BART, T5, Marian, DETR-style): the row of the decoder position
  that produced the explained token; ``R_qi`` for the encoder input, ``R_qq`` for the decoder
  prefix.
- :class:`CheferCoAttention` (LXMERT): two streams with co-attention, read from the text CLS.
- :class:`~captum_chefer.attr.single_stream.CheferSingleStream` (ViLT, VisualBERT) and
  :class:`~captum_chefer.attr.dual_encoder.CheferDualEncoder` (CLIP, SigLIP) have their own
  modules.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from ..core.bimodal import MultiStreamReader
from ..core.tokens import SelfRelevance, TokenIndex
from ..families import Family, StreamMap, family_for, family_named
from ._captum import TargetType, log_usage
from .base import AttentionAttribution
from .engine import Output, Read, ReadSpec

__all__ = [
    "CheferCoAttention",
    "CheferDualEncoder",
    "CheferEncoderDecoder",
    "CheferMultiModal",
    "CheferSingleStream",
]


class CheferMultiModal(AttentionAttribution):
    r"""Chefer, Gur & Wolf (ICCV 2021), eq. 6-11, for models with several token streams.

    Every modality ``x`` keeps ``R_xx`` (from ``I``) and every pair ``R_xy`` (from ``0``);
    self-attention updates them by eq. 6-7, co-/cross-attention by eq. 10-11 with the
    normalisation of eq. 8-9 (see :mod:`captum_chefer.core.bimodal`). The relevance of input
    ``i`` is row ``token_index`` of ``R_{read_stream, input_streams[i]}``. Supported families,
    and how to add one, are the table of :mod:`captum_chefer.families.table`.

    Args:
        forward_func: the model, or any callable returning a tensor (or an object with
            ``.logits``).
        model: the module whose attention is explained, when ``forward_func`` is not one.
        streams: which streams each attention call connects, by the calling module's name.
        read_stream: the stream whose token the prediction is read from.
        input_streams: the stream of each input, in the order of ``inputs``.
        causal_read: deprecated and ignored: ``token_index="auto"`` reads the rows the
            explained output is computed from, seen in the backward.
        family: an entry of :data:`~captum_chefer.families.FAMILIES` (its name, or a
            :class:`~captum_chefer.families.Family`) giving the three above; by default the
            entry whose ``model_types`` holds ``model.config.model_type`` (BLIP, LXMERT), else
            ``"encoder-decoder"``. The arguments above override it.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True).eval()
        >>> streams = StreamMap(((r"decoder.*multihead_attn", (("target", "source"),)),
        ...                      (r"decoder\.", (("target", "target"),)),
        ...                      (r"encoder\.", (("source", "source"),))))
        >>> explainer = CheferMultiModal(lambda s, t: model(s, t)[:, -1], model, streams,
        ...                              read_stream="target", input_streams=("source", "target"))
        >>> source, target = explainer.attribute((torch.randn(2, 5, 16), torch.randn(2, 3, 16)),
        ...                                      target=0, output="token")
        >>> source.shape, target.shape
        (torch.Size([2, 5]), torch.Size([2, 3]))
    """

    family_name: ClassVar[str | None] = None
    """The class's entry of the family table; None: found from the model."""

    def __init__(
        self,
        forward_func: Callable[..., Any],
        model: nn.Module | None = None,
        streams: StreamMap | None = None,
        read_stream: str | None = None,
        input_streams: Sequence[str] | None = None,
        causal_read: bool | None = None,
        family: str | Family | None = None,
    ) -> None:
        super().__init__(forward_func, model)
        entry = self._family(family)
        self.streams = streams if streams is not None else entry.streams
        self.read_stream = read_stream if read_stream is not None else entry.read_stream
        self.input_streams = tuple(input_streams) if input_streams else entry.input_streams
        if causal_read is not None:
            warnings.warn(
                "causal_read is deprecated and ignored: token_index='auto' reads the rows the "
                "explained output is computed from, seen in the backward.",
                DeprecationWarning,
                stacklevel=2,
            )

    def _family(self, family: str | Family | None) -> Family:
        if isinstance(family, Family):
            return family
        name = family or self.family_name
        if name is not None:
            return family_named(name)
        return family_for(self.model) or family_named("encoder-decoder")

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
        block_bytes: int | None = None,
        num_prefix_tokens: int | None = None,
        patch_grid: tuple[int, int] | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        r"""Relevance of each input's tokens for ``target``.

        Args:
            inputs: a tensor or tuple, passed first to ``forward_func``, one per modality in
                ``input_streams`` order: token ids ``(B, T)``, embeddings or region features
                ``(B, N, D)``, images ``(B, C, H, W)``.
            target: Captum's target on the output of ``forward_func``.
            additional_forward_args: passed positionally after ``inputs``.
            token_index: the tokens of ``read_stream`` the prediction is read from:
                ``"auto"`` (the rows the explained output is computed from, seen in the
                backward: the decoder position that produced the explained token, LXMERT's
                text CLS), ``"mean"``, an int, or a LongTensor ``(B,)``.
            self_relevance: how the identity's share is handled in ``R_xx``: ``"subtract"``,
                ``"zero"`` or ``"keep"`` (see :class:`CheferRelevance`).
            output: ``"input"`` maps each row onto its input's shape; ``"token"`` returns the
                rows ``(B, N_x)``.
            block_bytes: memory for one block of recomputed attention.
            num_prefix_tokens: tokens before an image's patch grid; inferred when None.
            patch_grid: ``(rows, cols)`` of an image's patches; inferred when None.

        Returns:
            One relevance per input (a tuple for a tuple), padding at 0.
        """
        reads = tuple(Read(self.read_stream, stream, token_index) for stream in self.input_streams)
        spec = ReadSpec(reads, self_relevance, output, num_prefix_tokens, patch_grid)
        return self._explain(
            MultiStreamReader(),
            spec,
            inputs,
            target,
            additional_forward_args,
            block_bytes,
            self.streams,
        )


class CheferEncoderDecoder(CheferMultiModal):
    r"""Encoder-decoder models (BART, T5, Marian, Pegasus): ICCV 2021 eq. 6-11.

    Encoder self-attention updates ``R_ii``; in each decoder layer the decoder self-attention
    updates ``R_qq`` and ``R_qi`` (eq. 6-7), then the cross-attention adds
    ``R̄_qqᵀ·Abar_qi·R̄_ii`` to ``R_qi`` (eq. 10). The answer is row ``token_index`` (default:
    the decoder position that produced the explained token, seen in the backward) of ``R_qi``
    for the encoder input and of ``R_qq`` for the decoder prefix.

    ``forward_func(input_ids, decoder_input_ids, *additional_forward_args)`` should return the
    logits of the explained decoder position ``(B, V)`` (or anything Captum's target selects
    from); ``inputs`` is ``input_ids`` or ``(input_ids, decoder_input_ids)``. For DETR, whose
    object queries are not causal, ``inputs`` is the pixels and ``token_index`` the query
    explained; the encoder row is laid on the feature map's grid and upsampled. T5's learned
    relative position bias reaches SDPA inside its float mask (transformers 5), so the
    recomputed attention includes it.

    Example:
        >>> import torch
        >>> from transformers import BartConfig, BartForConditionalGeneration
        >>> _ = torch.manual_seed(0)
        >>> config = BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
        ...     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        ...     decoder_ffn_dim=32, max_position_embeddings=32)
        >>> model = BartForConditionalGeneration(config).eval()
        >>> forward = lambda ids, dec: model(input_ids=ids, decoder_input_ids=dec).logits[:, -1]
        >>> ids, dec = torch.randint(4, 50, (2, 6)), torch.randint(4, 50, (2, 3))
        >>> source, prefix = CheferEncoderDecoder(forward, model).attribute((ids, dec), target=7)
        >>> source.shape, prefix.shape
        (torch.Size([2, 6]), torch.Size([2, 3]))
    """

    family_name = "encoder-decoder"


class CheferCoAttention(CheferMultiModal):
    r"""Two streams with co-attention (LXMERT): ICCV 2021 eq. 6-11.

    Language self-attention, then vision self-attention, then each cross layer: both cross
    directions are computed from the same old maps before either is added (eq. 10-11), then the
    cross layer's two self-attentions (eq. 6-7). The answer is the text CLS row (``token_index``,
    by default the row the score is computed from, seen in the backward) of ``R_tt`` for the
    text and of ``R_ti`` for the regions.

    ``inputs`` is ``(input_ids, visual_feats)``; ``forward_func`` returns the scores, e.g.
    ``lambda ids, feats, pos, mask: model(ids, feats, pos, mask).question_answering_score``.

    Example:
        >>> import torch
        >>> from transformers import LxmertConfig, LxmertForQuestionAnswering
        >>> _ = torch.manual_seed(0)
        >>> config = LxmertConfig(vocab_size=50, hidden_size=16, num_attention_heads=2,
        ...     intermediate_size=32, l_layers=1, x_layers=1, r_layers=1, visual_feat_dim=8,
        ...     visual_pos_dim=4, num_qa_labels=3)
        >>> model = LxmertForQuestionAnswering(config).eval()
        >>> def forward(ids, feats, boxes):
        ...     output = model(input_ids=ids, visual_feats=feats, visual_pos=boxes)
        ...     return output.question_answering_score
        >>> ids, feats = torch.randint(4, 50, (2, 6)), torch.randn(2, 3, 8)
        >>> boxes = torch.rand(2, 3, 4)
        >>> text, regions = CheferCoAttention(forward, model).attribute((ids, feats), 1, (boxes,))
        >>> text.shape, regions.shape
        (torch.Size([2, 6]), torch.Size([2, 3, 8]))
    """

    family_name = "co-attention"


from .dual_encoder import CheferDualEncoder  # noqa: E402 (the old home of both classes)
from .single_stream import CheferSingleStream  # noqa: E402
