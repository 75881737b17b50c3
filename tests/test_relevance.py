"""CheferRelevance against the plain full-matrix reference, model by model (float32 vs float64)."""

from __future__ import annotations

import copy

import models
import pytest
import torch
from reference import (
    assert_close,
    encoder_reference,
    hf_eager_attentions,
    hooked_attentions,
    image_map,
    one_hot_rows,
    read_rows,
    relevance_matrix,
)

from captum_chefer import CheferRelevance

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _ids(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(5, 100, (batch, size), generator=torch.Generator().manual_seed(seed))


def _pick(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, target.to(logits.device)[:, None]).squeeze(1)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["row", "matrix"])
def test_bert_matches_reference(attn_implementation, mode):
    model = models.bert(attn_implementation)
    ids, mask = _ids(3, 9), torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    target = torch.tensor([0, 2, 1])
    ours = CheferRelevance(lambda i, m: model(i, attention_mask=m).logits, model).attribute(
        ids, target=target.tolist(), additional_forward_args=(mask,), mode=mode
    )
    attn, grads = hf_eager_attentions(
        model, lambda out: _pick(out.logits, target), input_ids=ids, attention_mask=mask
    )
    expected = read_rows(relevance_matrix(attn, grads), one_hot_rows([0, 0, 0], 9))
    assert_close(ours, expected * mask)
    assert model.config._attn_implementation == attn_implementation


@pytest.mark.parametrize(
    "factory, side", [(models.gpt2, "left"), (models.llama, "right")], ids=["gpt2", "llama-gqa"]
)
def test_causal_lm_matches_reference_with_padding(factory, side):
    # (HF's float64 eager reference turns Llama's fully masked left-padding rows into NaN that
    # reach the real tokens, so Llama is checked with right padding.)
    model = factory()
    ids, mask = _ids(2, 8), torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0 if side == "left" else 1
    mask[1, 5:] = 0 if side == "right" else 1
    last = mask.sum(1) - 1 if side == "right" else torch.tensor([7, 7])
    target = torch.tensor([7, 11])
    read = lambda logits: logits[torch.arange(2), last]  # noqa: E731
    forward = lambda i, m: read(model(i, attention_mask=m).logits)  # noqa: E731
    ours = CheferRelevance(forward, model).attribute(ids, target, (mask,), output="token")
    attn, grads = hf_eager_attentions(
        model, lambda out: _pick(read(out.logits), target), input_ids=ids, attention_mask=mask
    )
    expected = read_rows(relevance_matrix(attn, grads), one_hot_rows(last.tolist(), 8))
    assert_close(ours, expected * mask)
    assert (ours[mask == 0] == 0).all()


def test_vit_image_map_matches_reference():
    model = models.vit()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([1, 4])
    ours = CheferRelevance(lambda x: model(x).logits, model).attribute(images, target=target)
    attn, grads = hf_eager_attentions(
        model, lambda out: _pick(out.logits, target), pixel_values=images
    )
    row = read_rows(relevance_matrix(attn, grads), one_hot_rows([0, 0], 17))
    assert_close(ours, image_map(row, 1, (4, 4), (32, 32), 3))


def test_timm_deit_two_prefix_tokens_matches_reference():
    model = models.deit()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([3, 500])
    # the class token's row: a distilled DeiT averages two heads, so "auto" refuses to guess
    ours = CheferRelevance(model).attribute(images, target=target, start_layer=1, token_index=0)
    reference = copy.deepcopy(model).double()
    for block in reference.blocks:
        block.attn.fused_attn = False
    attn, grads = hooked_attentions(
        reference,
        lambda: _pick(reference(images.double()), target),
        [block.attn.attn_drop for block in reference.blocks],
    )
    row = read_rows(relevance_matrix(attn, grads, start_layer=1), one_hot_rows([0, 0], 198))
    assert_close(ours, image_map(row, 2, (14, 14), (224, 224), 3))
    assert all(block.attn.fused_attn for block in model.blocks)


@pytest.mark.parametrize("mode", ["row", "matrix"])
def test_transformer_encoder_matches_reference(mode):
    model = models.EncoderClassifier().eval()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(4))
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    target = torch.tensor([2, 0])
    ours = CheferRelevance(model).attribute(x, target, (padding,), mode=mode)
    attn, grads = encoder_reference(model, x, target, padding)
    row = read_rows(relevance_matrix(attn, grads), one_hot_rows([0, 0], 6)) * ~padding
    assert_close(ours, row[..., None].expand(2, 6, 16))


@pytest.mark.parametrize("self_relevance", ["subtract", "zero", "keep"])
def test_custom_protocol_model_matches_reference(self_relevance):
    model = models.HandModel().eval()
    ids = _ids(2, 7, seed=5) % 50
    target = torch.tensor([1, 3])
    ours = CheferRelevance(model).attribute(
        ids, target=target, token_index=2, self_relevance=self_relevance
    )
    reference = copy.deepcopy(model).double()
    kept: list[torch.Tensor] = []
    for block in reference.blocks:
        block.keep = kept
    _pick(reference(ids), target).sum().backward()
    expected = read_rows(
        relevance_matrix(kept, [a.grad for a in kept]), one_hot_rows([2, 2], 7), self_relevance
    )
    assert_close(ours, expected)
