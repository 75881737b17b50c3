"""Chefer et al.'s bi-modal and encoder-decoder rules (ICCV 2021, eq. 6-11) as Captum attributions.

One forward with attention captured and every call tagged with the module that made it, one
backward from the selected output; each call's ``Abar`` (eq. 5) is kept, the calls are sorted
into modalities by a :class:`~captum_chefer.attr.streams.StreamMap`, and the maps ``R_xy`` are
updated in forward order by :class:`~captum_chefer.core.bimodal.MultiModalRelevance`. The
relevance of an input is a row of ``R_{read, x}``, where ``read`` is the modality the
prediction is read from and ``x`` the input's modality.

- :class:`CheferEncoderDecoder` (BART, T5, Marian, DETR-style): the row of the decoder position
  that produced the explained token; ``R_qi`` for the encoder input, ``R_qq`` for the decoder
  prefix.
- :class:`CheferCoAttention` (LXMERT): two streams with co-attention, read from the text CLS.
- :class:`CheferSingleStream` (ViLT, VisualBERT): self-attention over the joint sequence, the
  row split back per input.
- :class:`CheferDualEncoder` (CLIP, SigLIP): the similarity logit of an (image, text) pair,
  explained per tower.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..capture import CallRecord, scoped_method
from ..core.bimodal import AbarCollector, AttentionEdge, MultiModalRelevance
from ..core.layout import patches_to_image, split_segments
from ..core.tokens import (
    SelfRelevance,
    TokenIndex,
    apply_self_relevance,
    token_start_rows,
    tokens_to_input,
)
from ._captum import (
    GradientAttribution,
    TargetType,
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
    _is_tuple,
    log_usage,
)
from .base import FIXES, WINDOWED, check_output, module_or_none
from .streams import CO_ATTENTION, DUAL_ENCODER, ENCODER_DECODER, SINGLE_STREAM, StreamMap
from .trace import Trace, key_validity, trace_attention

Output = Literal["input", "token"]


@dataclass
class MultiModalTrace:
    """One traced forward and backward, with the relevance maps of every modality pair.

    Attributes:
        trace: the forward's output, target and attention records.
        state: ``R_xy`` after every layer (eq. 6-11).
        valid: bool ``(B, N_x)`` per modality, False at padding.
    """

    trace: Trace
    state: MultiModalRelevance
    valid: dict[str, Tensor] = field(default_factory=dict)

    def row(
        self, read: str, start: Tensor, column: str, self_relevance: SelfRelevance = "subtract"
    ) -> Tensor:
        """Rows ``start`` ``(B, N_read)`` of ``R_{read, column}``, ``(B, N_column)``.

        Within one modality the identity's share is handled by ``self_relevance`` as in
        :func:`~captum_chefer.core.tokens.apply_self_relevance`; padding gets 0.
        """
        relevance = self.state.relevance(read, column, include_identity=False)
        row = torch.bmm(start.unsqueeze(1).to(relevance), relevance).squeeze(1)
        if read == column:
            row = apply_self_relevance(row, start.to(row), self_relevance)
        return row.masked_fill(~self.valid[column], 0.0)


def trace_multimodal(
    forward_func: Callable[..., Any],
    model: nn.Module | None,
    inputs: tuple[Tensor, ...],
    target: TargetType,
    additional_forward_args: Any,
    streams: StreamMap,
    block_bytes: int | None = None,
) -> MultiModalTrace:
    """Trace ``forward_func`` once and apply ICCV 2021 eq. 6-11 over its attention calls."""
    collector = AbarCollector()
    valid: dict[str, Tensor] = {}

    def prepare(trace: Trace) -> None:
        valid.update(_stream_validity(trace.records, streams, trace.output.device))

    trace = trace_attention(
        forward_func,
        model,
        inputs,
        target,
        additional_forward_args,
        collector,
        prepare,
        block_bytes,
        scope_modules=True,
    )
    records = trace.records
    batch = trace.output.shape[0] if trace.output.dim() else 1
    if any(record.shape[0] != batch for record in records):
        shapes = sorted({record.shape for record in records})
        raise ValueError(
            f"The model's attention calls have shapes {shapes} (B, H, Nq, Nk), which the rules "
            f"do not define: {WINDOWED.format(batch=batch)}. {FIXES}"
        )
    device = trace.output.device
    state = MultiModalRelevance(streams.sizes(records), records[0].shape[0], device)
    for step in streams.steps(records):
        edges = [
            AttentionEdge(query, key, collector.abar(index, records[index].shape, device))
            for index, query, key in step
        ]
        state.step(edges)
    return MultiModalTrace(trace, state, valid)


def _stream_validity(
    records: Sequence[CallRecord], streams: StreamMap, device: torch.device
) -> dict[str, Tensor]:
    """Padding per modality, read off the key mask of the first call attending to it."""
    valid: dict[str, Tensor] = {}
    for step in streams.steps(records):
        for index, _query, key in step:
            if key not in valid:
                valid[key] = key_validity(records[index]).to(device)
    for name, size in streams.sizes(records).items():
        if name not in valid:
            valid[name] = torch.ones(records[0].shape[0], size, dtype=torch.bool, device=device)
    return valid


class CheferMultiModal(GradientAttribution):
    r"""Chefer, Gur & Wolf (ICCV 2021), eq. 6-11, for models with several token streams.

    Every modality ``x`` keeps ``R_xx`` (from ``I``) and every pair ``R_xy`` (from ``0``);
    self-attention updates them by eq. 6-7, co-/cross-attention by eq. 10-11 with the
    normalisation of eq. 8-9 (see :mod:`captum_chefer.core.bimodal`). The relevance of input
    ``i`` is row ``token_index`` of ``R_{read_stream, input_streams[i]}``.

    Args:
        forward_func: the model, or any callable returning a tensor (or an object with
            ``.logits``).
        model: the module whose attention is explained, when ``forward_func`` is not one.
        streams: which modalities each attention call connects, by the calling module's name.
        read_stream: the modality whose token the prediction is read from.
        input_streams: the modality of each input, in the order of ``inputs``.
        causal_read: whether ``token_index="auto"`` reads the last real token of
            ``read_stream`` (True) or the first (False).

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

    streams: StreamMap = ENCODER_DECODER
    read_stream: str = "decoder"
    input_streams: tuple[str, ...] = ("encoder", "decoder")
    causal_read: bool = True

    def __init__(
        self,
        forward_func: Callable[..., Any],
        model: nn.Module | None = None,
        streams: StreamMap | None = None,
        read_stream: str | None = None,
        input_streams: Sequence[str] | None = None,
        causal_read: bool | None = None,
    ) -> None:
        super().__init__(forward_func)
        self.model = model if model is not None else module_or_none(forward_func)
        self.streams = streams if streams is not None else self.streams
        self.read_stream = read_stream if read_stream is not None else self.read_stream
        self.input_streams = tuple(input_streams) if input_streams else self.input_streams
        self.causal_read = causal_read if causal_read is not None else self.causal_read

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
            token_index: the token of ``read_stream`` the prediction is read from: ``"auto"``
                (the last real token when ``causal_read``, else the first), an int, or a
                LongTensor ``(B,)``.
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
        is_inputs_tuple = _is_tuple(inputs)
        inputs_tuple = _format_tensor_into_tuples(inputs)
        check_output(output)
        if len(inputs_tuple) > len(self.input_streams):
            raise ValueError(
                f"{type(self).__name__} maps {len(self.input_streams)} inputs "
                f"{self.input_streams}, got {len(inputs_tuple)}; pass input_streams=(...) with "
                "one modality per input."
            )
        result = trace_multimodal(
            self.forward_func,
            self.model,
            inputs_tuple,
            target,
            additional_forward_args,
            self.streams,
            block_bytes,
        )
        _check_streams(result, (self.read_stream, *self.input_streams), type(self).__name__)
        valid = result.valid[self.read_stream]
        start = token_start_rows(token_index, valid, self.causal_read)
        rows = tuple(
            result.row(self.read_stream, start, stream, self_relevance)
            for stream in self.input_streams[: len(inputs_tuple)]
        )
        if output == "token":
            return _format_output(is_inputs_tuple, rows)
        mapped = tuple(
            tokens_to_input(row, tensor.shape, num_prefix_tokens, patch_grid).to(tensor.device)
            for row, tensor in zip(rows, inputs_tuple)
        )
        return _format_output(is_inputs_tuple, mapped)

    def has_convergence_delta(self) -> bool:
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        return False


class CheferEncoderDecoder(CheferMultiModal):
    r"""Encoder-decoder models (BART, T5, Marian, Pegasus): ICCV 2021 eq. 6-11.

    Encoder self-attention updates ``R_ii``; in each decoder layer the decoder self-attention
    updates ``R_qq`` and ``R_qi`` (eq. 6-7), then the cross-attention adds
    ``R̄_qqᵀ·Abar_qi·R̄_ii`` to ``R_qi`` (eq. 10). The answer is row ``token_index`` (default:
    the last real decoder position, the one that produced the explained token) of ``R_qi`` for
    the encoder input and of ``R_qq`` for the decoder prefix.

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


class CheferCoAttention(CheferMultiModal):
    r"""Two streams with co-attention (LXMERT): ICCV 2021 eq. 6-11.

    Language self-attention, then vision self-attention, then each cross layer: both cross
    directions are computed from the same old maps before either is added (eq. 10-11), then the
    cross layer's two self-attentions (eq. 6-7). The answer is the text CLS row (``token_index``,
    default the first real token) of ``R_tt`` for the text and of ``R_ti`` for the regions.

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

    streams = CO_ATTENTION
    read_stream = "text"
    input_streams = ("text", "image")
    causal_read = False


class CheferSingleStream(CheferMultiModal):
    r"""Single-stream models (ViLT, VisualBERT): the self-attention rule over the joint sequence.

    ``R = (I + Abar_L)…(I + Abar_1)`` over the concatenated text and image tokens (ICCV 2021
    eq. 6); the row of ``token_index`` (default: the first token, the text CLS both models pool
    from) is split back per input: the first ``segments[0]`` tokens belong to ``inputs[0]``, and
    so on. By default an ids or embeddings input ``(B, T[, D])`` takes ``T`` tokens and a single
    image input takes the rest: its prefix tokens (ViLT's image CLS) and its patches, laid on
    their grid. ViLT draws a random order of the patches in every forward; the order drawn is
    recorded during the call (its ``visual_embed`` is wrapped, then restored) so that each
    patch lands in its own cell.

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

    streams = SINGLE_STREAM
    read_stream = "joint"
    input_streams = ("joint",)
    causal_read = False

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        token_index: TokenIndex = 0,
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
        is_inputs_tuple = _is_tuple(inputs)
        inputs_tuple = _format_tensor_into_tuples(inputs)
        check_output(output)
        with _patch_positions(self.model) as positions:
            result = trace_multimodal(
                self.forward_func,
                self.model,
                inputs_tuple,
                target,
                additional_forward_args,
                self.streams,
                block_bytes,
            )
        _check_streams(result, (self.read_stream,), type(self).__name__)
        start = token_start_rows(token_index, result.valid["joint"], False)
        row = result.row("joint", start, "joint", self_relevance)
        sizes = list(segments) if segments is not None else _segment_sizes(inputs_tuple, row)
        rows = split_segments(row, sizes)
        if output == "token":
            return _format_output(is_inputs_tuple, rows)
        mapped = tuple(
            _map_segment(segment, tensor, positions, num_prefix_tokens, patch_grid)
            for segment, tensor in zip(rows, inputs_tuple)
        )
        return _format_output(is_inputs_tuple, mapped)


def _segment_sizes(inputs: tuple[Tensor, ...], row: Tensor) -> list[int]:
    images = [i for i, tensor in enumerate(inputs) if tensor.dim() == 4]
    if len(images) > 1:
        raise ValueError("Several image inputs: pass segments=(tokens of each input, in order).")
    sizes = [tensor.shape[1] if tensor.dim() in (2, 3) else 0 for tensor in inputs]
    if images:
        sizes[images[0]] = row.shape[1] - sum(sizes)
    return sizes


def _map_segment(
    row: Tensor,
    tensor: Tensor,
    positions: list[tuple[Tensor, tuple[int, int]]],
    num_prefix_tokens: int | None,
    patch_grid: tuple[int, int] | None,
) -> Tensor:
    if tensor.dim() == 4 and positions:
        patch_index, grid = positions[-1]
        prefix = row.shape[1] - patch_index.shape[1]
        image = patches_to_image(row[:, prefix:], patch_index, grid, tensor.shape)
        return image.to(tensor.device)
    return tokens_to_input(row, tensor.shape, num_prefix_tokens, patch_grid).to(tensor.device)


@contextmanager
def _patch_positions(model: nn.Module | None) -> Iterator[list[tuple[Tensor, tuple[int, int]]]]:
    """Record the patch order ViLT-style embeddings draw, by wrapping ``visual_embed``.

    The wrapper acts on this thread only (see :func:`~captum_chefer.capture.scoped_method`).
    """
    found: list[tuple[Tensor, tuple[int, int]]] = []
    modules = [
        module
        for module in (model.modules() if model is not None else ())
        if callable(getattr(type(module), "visual_embed", None))
    ]
    with ExitStack() as stack:
        for module in modules:
            wrapper = functools.partial(_recording_visual_embed, found)
            stack.enter_context(scoped_method(module, "visual_embed", wrapper))
        yield found


def _recording_visual_embed(
    found: list, visual_embed: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    embeddings, masks, (patch_index, grid) = visual_embed(*args, **kwargs)
    found.append((patch_index, (int(grid[0]), int(grid[1]))))
    return embeddings, masks, (patch_index, grid)


class CheferDualEncoder(GradientAttribution):
    r"""Dual encoders (CLIP, SigLIP): the similarity logit of (image, text) pairs.

    Each tower only attends within itself, so each gets the self-attention rule (ICCV 2021
    eq. 6) with its own calls, told apart by the module that made them. The gradient comes from
    the pair's logit in ``logits_per_image`` ``(B_img, B_txt)``. The image relevance is the
    CLS row of the vision tower (CLIP). SigLIP pools the image with an attention head whose
    single learned query (the *probe*) attends to the patches: the probe is treated as a
    modality of its own that attends to the image, so its row is ``Abar_probe·R̄_ii`` (eq. 10
    with ``R̄_pp = 1``). The text relevance is the row of the token the text embedding is pooled
    from: CLIP's EOT token (the highest id when the config's ``eos_token_id`` is 2, else the
    first ``eos_token_id``), SigLIP's last token, or the last real token for other models.

    Args:
        model: a dual encoder; by default it is called as
            ``model(pixel_values=..., input_ids=..., attention_mask=...)`` and its
            ``logits_per_image`` explained.
        forward_func: instead, ``forward_func(pixel_values, input_ids, *additional)`` returning
            ``logits_per_image`` ``(B_img, B_txt)`` or an object that has it.
        streams: the towers' stream rules.

    Example:
        >>> import torch
        >>> from transformers import CLIPConfig, CLIPModel
        >>> _ = torch.manual_seed(0)
        >>> tower = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...              intermediate_size=32)
        >>> config = CLIPConfig(text_config=dict(vocab_size=50, eos_token_id=2, **tower),
        ...                     vision_config=dict(image_size=16, patch_size=8, **tower))
        >>> model = CLIPModel(config).eval()
        >>> images, ids = torch.randn(2, 3, 16, 16), torch.randint(3, 50, (2, 5))
        >>> image_map, text = CheferDualEncoder(model).attribute((images, ids))
        >>> image_map.shape, text.shape
        (torch.Size([2, 3, 16, 16]), torch.Size([2, 5]))
    """

    def __init__(
        self,
        model: nn.Module,
        forward_func: Callable[..., Any] | None = None,
        streams: StreamMap = DUAL_ENCODER,
    ) -> None:
        self.user_forward = forward_func
        self.model = model
        self.streams = streams
        super().__init__(self._pair_logits)

    def _pair_logits(self, pixel_values: Tensor, input_ids: Tensor, *rest: Any) -> Tensor:
        if self.user_forward is not None:
            output = self.user_forward(pixel_values, input_ids, *rest)
        else:
            mask = rest[0] if rest else None
            output = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask)
        logits = output if isinstance(output, Tensor) else output.logits_per_image
        return logits.diagonal()

    @log_usage()
    def attribute(
        self,
        inputs: tuple[Tensor, Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        image_token_index: TokenIndex = 0,
        text_token_index: TokenIndex = "auto",
        self_relevance: SelfRelevance = "subtract",
        output: Output = "input",
        block_bytes: int | None = None,
        num_prefix_tokens: int | None = None,
        patch_grid: tuple[int, int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""Relevance of the pixels and the text tokens for each pair's similarity.

        Args:
            inputs: ``(pixel_values (B_img, C, H, W), input_ids (B_txt, T))``.
            target: the text paired with each image, Captum-style on ``logits_per_image``:
                None pairs image ``i`` with text ``i`` (the diagonal); an int pairs every image
                with that text; a list or LongTensor ``(B_img,)`` gives a text per image.
            additional_forward_args: passed after the inputs; for the default forward, the
                texts' ``attention_mask`` ``(B_txt, T)``. Tensors with one row per text are
                reordered with the texts.
            image_token_index: the vision tower's pooled token (CLS, 0); ignored when the
                tower pools with an attention probe.
            text_token_index: the text tower's pooled token; ``"auto"`` as described above.
            self_relevance: the identity's share in ``R_xx``: ``"subtract"``, ``"zero"`` or
                ``"keep"``.
            output: ``"input"`` maps the rows onto the pixels and the ids; ``"token"`` returns
                the rows ``(B_img, N_img)`` and ``(B_img, T)``.
            block_bytes, num_prefix_tokens, patch_grid: as in :class:`CheferRelevance`.

        Returns:
            ``(image map (B_img, C, H, W), text relevance (B_img, T))``: row ``i`` explains
            pair ``i``.
        """
        check_output(output)
        pixel_values, input_ids = inputs
        pairs = _pair_index(target, pixel_values.shape[0], input_ids.shape[0], input_ids.device)
        texts = input_ids.index_select(0, pairs)
        extra = tuple(
            arg.index_select(0, pairs.to(arg.device))
            if isinstance(arg, Tensor) and arg.dim() > 0 and arg.shape[0] == input_ids.shape[0]
            else arg
            for arg in _format_additional_forward_args(additional_forward_args) or ()
        )
        result = trace_multimodal(
            self.forward_func,
            self.model,
            (pixel_values, texts),
            None,
            extra,
            self.streams,
            block_bytes,
        )
        _check_streams(result, ("image", "text"), type(self).__name__)
        text_start = self._text_start(texts, result.valid["text"], text_token_index)
        text_row = result.row("text", text_start, "text", self_relevance)
        image_row = self._image_row(result, image_token_index, self_relevance)
        if output == "token":
            return image_row, text_row
        image_map = tokens_to_input(image_row, pixel_values.shape, num_prefix_tokens, patch_grid)
        return image_map.to(pixel_values.device), text_row.to(texts.device)

    def _image_row(
        self, result: MultiModalTrace, token_index: TokenIndex, self_relevance: SelfRelevance
    ) -> Tensor:
        valid = result.valid["image"]
        if "probe" in result.state.sizes:
            start = torch.ones(valid.shape[0], result.state.sizes["probe"], device=valid.device)
            return result.row("probe", start / start.shape[1], "image")
        start = token_start_rows(token_index, valid, False)
        return result.row("image", start, "image", self_relevance)

    def _text_start(self, input_ids: Tensor, valid: Tensor, token_index: TokenIndex) -> Tensor:
        if not (isinstance(token_index, str) and token_index == "auto"):
            return token_start_rows(token_index, valid, True)
        size = input_ids.shape[1]
        eos = getattr(getattr(self.model, "text_model", None), "eos_token_id", None)
        model_type = str(getattr(getattr(self.model, "config", None), "model_type", ""))
        if eos is not None:
            ids = input_ids.to(torch.int)
            index = ids.argmax(-1) if eos == 2 else (ids == eos).int().argmax(-1)
            return torch.nn.functional.one_hot(index.long(), size).float().to(valid.device)
        if model_type.startswith("siglip"):
            return token_start_rows(-1, valid, True)
        return token_start_rows("auto", valid, True)

    def has_convergence_delta(self) -> bool:
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        return False


def _pair_index(target: TargetType, n_images: int, n_texts: int, device: torch.device) -> Tensor:
    """The text index of each image's pair, from a Captum target on ``(B_img, B_txt)``."""
    if target is None:
        if n_images != n_texts:
            raise ValueError(
                f"target=None pairs image i with text i, but there are {n_images} images and "
                f"{n_texts} texts; pass target= with the text index for each image."
            )
        return torch.arange(n_images, device=device)
    index = torch.as_tensor(target, device=device, dtype=torch.long).reshape(-1)
    if index.numel() == 1:
        index = index.expand(n_images)
    if index.numel() != n_images:
        raise ValueError(
            f"target has {index.numel()} entries for {n_images} images; give one text index per "
            "image, a single int, or None for the diagonal pairs."
        )
    return index


def _check_streams(result: MultiModalTrace, needed: Sequence[str], name: str) -> None:
    missing = sorted(set(needed) - set(result.state.sizes))
    if missing:
        found = {record.module for record in result.trace.records}
        raise ValueError(
            f"{name} found no attention call of the modalities {missing} (the calls came from "
            f"the modules {sorted(str(m) for m in found)}); pass streams=StreamMap(...) with "
            "rules naming them, or use the class for this kind of model."
        )
