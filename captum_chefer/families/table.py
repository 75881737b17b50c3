"""The model families of the multi-stream rules, one table entry each.

An entry says which modules form which stream (a :class:`StreamMap`), which stream the
prediction is read from, and the stream of each input. Adding a family means adding an entry
here: :class:`~captum_chefer.attr.CheferMultiModal` picks the entry whose ``model_types``
holds the model's ``config.model_type``, or the one named by ``family=``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .streams import StreamMap


@dataclass(frozen=True)
class Family:
    """How a family's attention calls form streams, and how its inputs are read.

    Which tokens of the read stream are read is not part of an entry: ``token_index="auto"``
    reads the rows the output is computed from, seen in the backward.

    Attributes:
        streams: which stream pair each attention call connects, by the calling module.
        reads: per input, ``(read stream, input stream)``: the input's relevance is a row of
            ``R_{read stream, input stream}``.
        model_types: the ``config.model_type`` values the family is picked for.
        explainer: the class that explains the family, named by a refusal of another class.
        named_for: further ``config.model_type`` values a refusal names ``explainer`` for.
    """

    streams: StreamMap
    reads: tuple[tuple[str, str], ...]
    model_types: tuple[str, ...] = ()
    explainer: str = "CheferMultiModal"
    named_for: tuple[str, ...] = ()

    @property
    def read_stream(self) -> str:
        """The stream of the first read, where the prediction of most families is read."""
        return self.reads[0][0]

    @property
    def input_streams(self) -> tuple[str, ...]:
        """The stream of each input, in the order of ``inputs``."""
        return tuple(stream for _, stream in self.reads)


SELF_ATTENTION = StreamMap(((r"", (("tokens", "tokens"),)),))
"""One sequence attending to itself: every single-stream model (BERT, ViT, GPT, …)."""

FAMILIES: dict[str, Family] = {
    # BART, T5, Marian, Pegasus, DETR, nn.Transformer: encoder self-attention, decoder self- and
    # cross-attention; read at the decoder position that produced the explained token.
    "encoder-decoder": Family(
        StreamMap(
            (
                (
                    r"(^|\.)decoder\..*"
                    r"(encoder_attn|EncDecAttention|crossattention|cross_attn|multihead_attn)",
                    (("decoder", "encoder"),),
                ),
                (r"(^|\.)decoder\.", (("decoder", "decoder"),)),
                (r"(^|\.)encoder\.", (("encoder", "encoder"),)),
            )
        ),
        (("decoder", "encoder"), ("decoder", "decoder")),
        explainer="CheferEncoderDecoder",
    ),
    # LXMERT: language and vision self-attention, then cross layers (both directions, one
    # step); read at the text CLS.
    "co-attention": Family(
        StreamMap(
            (
                (r"x_layers\.\d+\.visual_attention\b", (("text", "image"), ("image", "text"))),
                (
                    r"(x_layers\.\d+\.lang_self_att|(^|\.)encoder\.layer\.\d+)\.",
                    (("text", "text"),),
                ),
                (r"(x_layers\.\d+\.visn_self_att|r_layers\.\d+)\.", (("image", "image"),)),
            )
        ),
        (("text", "text"), ("text", "image")),
        model_types=("lxmert",),
        explainer="CheferCoAttention",
    ),
    # ViLT, VisualBERT: self-attention over the joint text-and-image sequence, split back per
    # input (CheferSingleStream).
    "single-stream": Family(
        StreamMap(((r"", (("joint", "joint"),)),)),
        (("joint", "joint"),),
        explainer="CheferSingleStream",
        named_for=("vilt", "visual_bert"),
    ),
    # CLIP, SigLIP: two towers, each attending within itself; SigLIP's attention-pooling head
    # is a query stream "probe" that the image is read from (CheferDualEncoder).
    "dual-encoder": Family(
        StreamMap(
            (
                (r"(^|\.)vision_model\.head\b", (("probe", "image"),)),
                (r"(^|\.)vision_model\.", (("image", "image"),)),
                (r"(^|\.)text_model\.", (("text", "text"),)),
            ),
            pooled_by={"image": "probe"},
        ),
        (("image", "image"), ("text", "text")),
        named_for=(
            "clip",
            "siglip",
            "siglip2",
            "chinese_clip",
            "altclip",
            "clip_vision_model",
            "siglip_vision_model",
            "siglip2_vision_model",
        ),
        explainer="CheferDualEncoder",
    ),
    # BLIP image-text matching (BlipForImageTextRetrieval, use_itm_head=True): a ViT, and a
    # text encoder whose layers attend to the image after their self-attention; the score is
    # read at the text's first token.
    "blip-itm": Family(
        StreamMap(
            (
                (r"(^|\.)text_encoder\..*crossattention\b", (("text", "image"),)),
                (r"(^|\.)text_encoder\.", (("text", "text"),)),
                (r"(^|\.)vision_model\.", (("image", "image"),)),
            )
        ),
        (("text", "text"), ("text", "image")),
        model_types=("blip",),
    ),
}
"""The families, by name (``family=`` of :class:`~captum_chefer.attr.CheferMultiModal`)."""


def family_named(name: str) -> Family:
    """The entry ``name`` of :data:`FAMILIES`, or an error listing the names."""
    if name not in FAMILIES:
        raise ValueError(f"Unknown family {name!r}; the families are {sorted(FAMILIES)}.")
    return FAMILIES[name]


def explainer_for(model: nn.Module | None) -> str | None:
    """The class a refusal names for the model's family (by ``config.model_type``), if any.

    Example:
        >>> explainer_for(None) is None
        True
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES.values():
        if model_type in (*family.model_types, *family.named_for):
            return family.explainer
    return None


def family_for(model: nn.Module | None) -> Family | None:
    """The entry whose ``model_types`` holds the model's ``config.model_type``, if any."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    return None
