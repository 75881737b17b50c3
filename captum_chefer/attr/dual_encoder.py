"""``CheferDualEncoder``: the similarity logit of (image, text) pairs of a dual encoder."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..core.bimodal import MultiStreamReader
from ..core.tokens import SelfRelevance, TokenIndex, per_example
from ..families import StreamMap, family_named
from ._captum import TargetType, _format_additional_forward_args, log_usage
from .base import AttentionAttribution
from .engine import Output, Read, ReadSpec


class CheferDualEncoder(AttentionAttribution):
    r"""Dual encoders (CLIP, SigLIP): the similarity logit of (image, text) pairs.

    Each tower only attends within itself, so each gets the self-attention rule (ICCV 2021
    eq. 6) with its own calls, told apart by the module that made them. The gradient comes from
    the pair's logit in ``logits_per_image`` ``(B_img, B_txt)``. Each tower is read at the
    rows its embedding is pooled from, seen in the backward (``"auto"``): the vision tower's
    CLS row (CLIP), the text's EOT token (CLIP) or last token (SigLIP), whatever the ids and
    the config say. SigLIP pools the image with an attention head whose single learned query
    (the *probe*) attends to the patches: the probe is treated as a modality of its own that
    attends to the image, so its row is ``Abar_probe·R̄_ii`` (eq. 10 with ``R̄_pp = 1``).

    The arguments come in the order of every other class. ``CheferDualEncoder(model)`` calls
    the model as ``model(pixel_values=..., input_ids=..., attention_mask=...)`` and explains
    its ``logits_per_image``. The old order ``CheferDualEncoder(model, forward_func)`` still
    works, with a ``DeprecationWarning``.

    Args:
        forward_func: the dual encoder itself, or ``forward_func(pixel_values, input_ids,
            *additional)`` returning ``logits_per_image`` ``(B_img, B_txt)`` or an object that
            has it.
        model: the dual encoder, when ``forward_func`` is not it.
        streams: the towers' stream rules; by default the ``"dual-encoder"`` family's.

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
        forward_func: Callable[..., Any] | None = None,
        model: nn.Module | None = None,
        streams: StreamMap | None = None,
    ) -> None:
        forward_func, model = _new_order(forward_func, model)
        self.user_forward = None if forward_func is model else forward_func
        super().__init__(self._pair_logits, model)
        self.streams = streams if streams is not None else family_named("dual-encoder").streams

    def _pair_logits(self, pixel_values: Tensor, input_ids: Tensor, *rest: Any) -> Tensor:
        if self.user_forward is not None:
            output = self.user_forward(pixel_values, input_ids, *rest)
        else:
            assert self.model is not None
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
        image_token_index: TokenIndex = "auto",
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
            image_token_index: the vision tower's row read: ``"auto"`` (the rows its embedding
                is pooled from, as described above), an int or a LongTensor ``(B_img,)``;
                ignored when the tower pools with an attention probe.
            text_token_index: the text tower's row read, likewise.
            self_relevance: the identity's share in ``R_xx``: ``"subtract"``, ``"zero"`` or
                ``"keep"``.
            output: ``"input"`` maps the rows onto the pixels and the ids; ``"token"`` returns
                the rows ``(B_img, N_img)`` and ``(B_img, T)``.
            block_bytes, num_prefix_tokens, patch_grid: as in :class:`CheferRelevance`.

        Returns:
            ``(image map (B_img, C, H, W), text relevance (B_img, T))``: row ``i`` explains
            pair ``i``.
        """
        pixel_values, input_ids = inputs
        pairs = _pair_index(target, pixel_values.shape[0], input_ids.shape[0], input_ids.device)
        texts = input_ids.index_select(0, pairs)
        extra = tuple(
            arg.index_select(0, pairs.to(arg.device))
            if isinstance(arg, Tensor) and arg.dim() > 0 and arg.shape[0] == input_ids.shape[0]
            else arg
            for arg in _format_additional_forward_args(additional_forward_args) or ()
        )
        reads = (
            Read("image", "image", image_token_index),
            Read("text", "text", text_token_index),
        )
        spec = ReadSpec(reads, self_relevance, output, num_prefix_tokens, patch_grid)
        image, text = self._explain(
            MultiStreamReader(), spec, (pixel_values, texts), None, extra, block_bytes, self.streams
        )
        return image, text


def _new_order(
    forward_func: Callable[..., Any] | None, model: nn.Module | None
) -> tuple[Callable[..., Any], nn.Module]:
    """``(forward_func, model)``, from the new order or, with a warning, the old one."""
    if (
        isinstance(forward_func, nn.Module)
        and model is not None
        and not isinstance(model, nn.Module)
    ):
        warnings.warn(
            "CheferDualEncoder(model, forward_func) is deprecated: the arguments now come in the "
            "order of every other class, CheferDualEncoder(forward_func, model).",
            DeprecationWarning,
            stacklevel=3,
        )
        forward_func, model = model, forward_func
    if model is None and isinstance(forward_func, nn.Module):
        model = forward_func
    if model is None or forward_func is None:
        raise ValueError(
            "CheferDualEncoder needs the dual encoder: pass CheferDualEncoder(model), or "
            "CheferDualEncoder(forward_func, model)."
        )
    return forward_func, model


def _pair_index(target: TargetType, n_images: int, n_texts: int, device: torch.device) -> Tensor:
    """The text index of each image's pair, from a Captum target on ``(B_img, B_txt)``."""
    if target is None:
        if n_images != n_texts:
            raise ValueError(
                f"target=None pairs image i with text i, but there are {n_images} images and "
                f"{n_texts} texts; pass target= with the text index for each image."
            )
        return torch.arange(n_images, device=device)
    error = (
        "target has {n} entries for {batch} images; give one text index per image, a single "
        "int, or None for the diagonal pairs."
    )
    return per_example(torch.as_tensor(target, device=device), n_images, error)
