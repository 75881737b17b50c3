"""The attention baselines of Chefer et al.'s papers, as Captum attributions.

They share the capture layer and the calling convention of :class:`CheferRelevance`: the same
``inputs``, ``target``, ``additional_forward_args``, ``token_index``, ``output``,
``num_prefix_tokens``, ``patch_grid`` and ``block_bytes``; padding gets exactly 0; a tuple of
inputs gives a tuple of maps. Each runs one forward and one backward, even the gradient-free
ones, so that the attention is recomputed a block of query rows at a time like the rule's.

Their rows have no identity term to subtract, so ``self_relevance`` is ``"zero"`` (default:
the read token set to 0, as the papers' code drops the CLS column, e.g. ``rollout[:, 0, 1:]``)
or ``"keep"``. With ``token_index="mean"`` pass ``"keep"``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from ..core import (
    AttentionGradCAMReader,
    GradientRolloutReader,
    HeadFusion,
    RawAttentionReader,
    RolloutReader,
)
from ..core.readers import Reader
from ..core.tokens import SelfRelevance, TokenIndex
from ._captum import TargetType, log_usage
from .base import AttentionAttribution
from .engine import Output, Read, ReadSpec


def _spec(
    token_index: TokenIndex,
    output: Output,
    self_relevance: SelfRelevance,
    num_prefix_tokens: int | None,
    patch_grid: tuple[int, int] | None,
) -> ReadSpec:
    """One row of the one stream, mapped onto every input: the single-stream read spec."""
    read = Read("tokens", "tokens", token_index)
    return ReadSpec(
        (read,), self_relevance, output, num_prefix_tokens, patch_grid, one_token_row=True
    )


class _LastLayerBaseline(AttentionAttribution):
    """A baseline read off the last attention layer by a reader without options."""

    reader_type: ClassVar[type[Reader]]

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        token_index: TokenIndex = "auto",
        output: Output = "input",
        self_relevance: SelfRelevance = "zero",
        block_bytes: int | None = None,
        num_prefix_tokens: int | None = None,
        patch_grid: tuple[int, int] | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        """The read row of the last attention layer, reduced as the class describes.

        Args:
            self_relevance: ``"zero"`` (default) sets the read token to 0; ``"keep"`` keeps it.

        The other arguments (``inputs``, ``target``, ``additional_forward_args``,
        ``token_index``, ``output``, ``block_bytes``, ``num_prefix_tokens``, ``patch_grid``)
        are those of :meth:`CheferRelevance.attribute`.

        Returns:
            Relevance shaped like ``inputs`` (a tuple for a tuple), or ``(B, N)`` with
            ``output="token"``; padding at exactly 0.
        """
        spec = _spec(token_index, output, self_relevance, num_prefix_tokens, patch_grid)
        reader = self.reader_type()
        return self._explain(reader, spec, inputs, target, additional_forward_args, block_bytes)


class RawAttention(_LastLayerBaseline):
    """Raw attention: the last layer's head-mean attention at the read row, ``mean_h(A_L)[c]``.

    The "raw attention" baseline of Chefer, Gur & Wolf (CVPR 2021, Sec. 4; ICCV 2021, Sec. 4).

    Example:
        >>> import torch
        >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        >>> encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
        >>> head = torch.nn.Linear(16, 3)
        >>> model = lambda x: head(encoder(x)[:, 0])  # a classifier on the first token
        >>> x = torch.randn(2, 5, 16)
        >>> raw = RawAttention(model, encoder)
        >>> row = raw.attribute(x, target=0, output="token", self_relevance="keep")
        >>> torch.allclose(row.sum(1), torch.ones(2))  # one attention row per example
        True
    """

    reader_type = RawAttentionReader


class AttentionRollout(AttentionAttribution):
    """Attention rollout (Abnar & Zuidema, ACL 2020): ``Â_L … Â_start`` read at row ``c``.

    ``Â_l = rownorm(fuse_h(A_l) + I)``: the identity models the residual connection, and every
    row is normalised to sum to 1; the product runs over the layers from ``start_layer`` up, as
    in Chefer et al.'s ``compute_rollout_attention`` (CVPR 2021 code). ``head_fusion="mean"``
    is the paper's; ``"max"`` and ``"min"`` are the variants of jacobgil/vit-explain.

    Example:
        >>> import torch
        >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        >>> encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
        >>> head = torch.nn.Linear(16, 3)
        >>> model = lambda x: head(encoder(x)[:, 0])  # a classifier on the first token
        >>> x = torch.randn(2, 5, 16)
        >>> rollout = AttentionRollout(model, encoder)
        >>> rollout.attribute(x, target=0, head_fusion="max").shape
        torch.Size([2, 5, 16])
        >>> row = rollout.attribute(x, target=0, output="token", self_relevance="keep")
        >>> torch.allclose(row.sum(1), torch.ones(2))  # a product of row-stochastic matrices
        True
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
        self_relevance: SelfRelevance = "zero",
        start_layer: int = 0,
        head_fusion: HeadFusion = "mean",
        block_bytes: int | None = None,
        num_prefix_tokens: int | None = None,
        patch_grid: tuple[int, int] | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        """The rolled-out attention from the read token to every token.

        Args:
            start_layer: the first attention layer (forward order) in the product.
            head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
            self_relevance: ``"zero"`` (default) sets the read token to 0; ``"keep"`` keeps it.

        The other arguments (``inputs``, ``target``, ``additional_forward_args``,
        ``token_index``, ``output``, ``block_bytes``, ``num_prefix_tokens``, ``patch_grid``)
        are those of :meth:`CheferRelevance.attribute`.

        Returns:
            Relevance shaped like ``inputs`` (a tuple for a tuple), or ``(B, N)`` with
            ``output="token"``; padding at exactly 0.
        """
        if head_fusion not in ("mean", "max", "min"):
            raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', not {head_fusion!r}")
        spec = _spec(token_index, output, self_relevance, num_prefix_tokens, patch_grid)
        reader = RolloutReader(start_layer, head_fusion)
        return self._explain(reader, spec, inputs, target, additional_forward_args, block_bytes)


class AttentionGradCAM(_LastLayerBaseline):
    """Attention Grad-CAM, the baseline of Chefer, Gur & Wolf (CVPR 2021).

    Chefer, Gur, Wolf, "Transformer Interpretability Beyond Attention Visualization", CVPR
    2021, Sec. 4; code: github.com/hila-chefer/Transformer-Explainability,
    ``baselines/ViT/ViT_explanation_generator.py`` (``GradCam.generate_cam_attn``, called
    ``generate_attn_gradcam`` in the repository's other explanation generators). On the last
    layer only, per head ``h``, the read row of the attention ``A_h[c]`` is weighted by its
    gradient ``dA_h[c]`` averaged over the patch positions (``grad.mean(dim=[1, 2])`` over the
    14×14 grid there; here over the real tokens after ``num_prefix_tokens``, so all real tokens
    for text); the heads are averaged, then clamped:
    ``clamp(mean_h(A_h[c] · mean_p dA_h[c, p]), min=0)``. (The repository's BERT generator
    averages the gradient over the whole ``N × N`` map instead; the ViT definition is used.)

    Example:
        >>> import torch
        >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        >>> encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
        >>> head = torch.nn.Linear(16, 3)
        >>> model = lambda x: head(encoder(x)[:, 0])  # a classifier on the first token
        >>> x = torch.randn(2, 5, 16)
        >>> cam = AttentionGradCAM(model, encoder).attribute(x, target=0, output="token")
        >>> cam.shape, bool((cam >= 0).all()), bool((cam[:, 0] == 0).all())
        (torch.Size([2, 5]), True, True)
    """

    reader_type = AttentionGradCAMReader


class GradientRollout(AttentionAttribution):
    """Gradient-weighted rollout: the rollout of ``Abar_l = mean_h(clamp(A_l ⊙ dA_l, min=0))``.

    ``Â_l = rownorm(Abar_l + I)`` with Chefer et al.'s head reduction (ICCV 2021 eq. 5) in
    place of the head mean, multiplied from ``start_layer`` up as in :class:`AttentionRollout`.
    This is jacobgil/vit-explain's ``grad_rollout`` without its three bugs: there the
    gradients, collected last layer first, are zipped with attentions collected first layer
    first; the row sum is taken without ``keepdim`` (dividing columns, not rows); and the head
    mean is taken before the clamp.

    Example:
        >>> import torch
        >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        >>> encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
        >>> head = torch.nn.Linear(16, 3)
        >>> model = lambda x: head(encoder(x)[:, 0])  # a classifier on the first token
        >>> x = torch.randn(2, 5, 16)
        >>> rollout = GradientRollout(model, encoder)
        >>> row = rollout.attribute(x, 0, output="token", self_relevance="keep")
        >>> torch.allclose(row.sum(1), torch.ones(2))
        True
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
        self_relevance: SelfRelevance = "zero",
        start_layer: int = 0,
        block_bytes: int | None = None,
        num_prefix_tokens: int | None = None,
        patch_grid: tuple[int, int] | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        """The rolled-out gradient-weighted attention from the read token to every token.

        Args:
            start_layer: the first attention layer (forward order) in the product.
            self_relevance: ``"zero"`` (default) sets the read token to 0; ``"keep"`` keeps it.

        The other arguments (``inputs``, ``target``, ``additional_forward_args``,
        ``token_index``, ``output``, ``block_bytes``, ``num_prefix_tokens``, ``patch_grid``)
        are those of :meth:`CheferRelevance.attribute`.

        Returns:
            Relevance shaped like ``inputs`` (a tuple for a tuple), or ``(B, N)`` with
            ``output="token"``; padding at exactly 0.
        """
        spec = _spec(token_index, output, self_relevance, num_prefix_tokens, patch_grid)
        reader = GradientRolloutReader(start_layer)
        return self._explain(reader, spec, inputs, target, additional_forward_args, block_bytes)
