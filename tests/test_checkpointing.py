"""Activation checkpointing gives the map of the same model without it, or a refusal that works.

Non-reentrant checkpointing (Hugging Face's and timm's default, ``use_reentrant=False`` in
torch) recomputes a block during the backward; the capture stays active there, so the
recomputation runs through the same route and the map is the same. Reentrant checkpointing
runs the block without gradients and cannot be back-propagated by ``torch.autograd.grad``: it
is refused, naming the switch to non-reentrant, which then gives the same map. Before, the
checkpointed layers were captured and silently dropped (a relative error of 0.60), or the
backward failed with torch's ``CheckpointError``.
"""

from __future__ import annotations

import copy
import warnings

import models
import pytest
import torch
from reference import assert_close
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from captum_chefer import (
    CPLRP,
    AttentionGradCAM,
    AttentionRollout,
    AttnLRP,
    CheferRelevance,
    GradientRollout,
    RawAttention,
)

METHODS = [
    CheferRelevance,
    RawAttention,
    AttentionRollout,
    AttentionGradCAM,
    GradientRollout,
    AttnLRP,
    CPLRP,
]


class Blocks(nn.Module):
    """Embeddings, a sequence of ``nn.TransformerEncoderLayer`` blocks run plainly, through
    ``checkpoint_sequential`` or through ``checkpoint`` per block, and a class head."""

    def __init__(self, how: str = "plain", reentrant: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.how, self.reentrant = how, reentrant
        self.embed = nn.Embedding(50, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.blocks = nn.Sequential(*[copy.deepcopy(layer) for _ in range(3)])
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        x = self.embed(ids)
        if self.how == "sequential":
            x = checkpoint_sequential(self.blocks, 3, x, use_reentrant=self.reentrant)
        elif self.how == "per block":
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=self.reentrant)
        else:
            x = self.blocks(x)
        return self.head(x[:, 0])


def _ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("how", ["sequential", "per block"])
def test_non_reentrant_checkpointing_gives_the_same_map(how, method):
    plain = method(Blocks().eval()).attribute(_ids(), target=1)
    checkpointed = method(Blocks(how).eval()).attribute(_ids(), target=1)
    assert torch.equal(checkpointed, plain)


@pytest.mark.parametrize("method", [CheferRelevance, AttnLRP])
@pytest.mark.parametrize("how", ["sequential", "per block"])
def test_reentrant_checkpointing_is_refused_naming_the_fix_that_works(how, method):
    with pytest.raises(RuntimeError, match=r"use_reentrant=True.*use_reentrant=False"):
        method(Blocks(how, reentrant=True).eval()).attribute(_ids(), target=1)
    fixed = method(Blocks(how, reentrant=False).eval()).attribute(_ids(), target=1)
    assert torch.equal(fixed, method(Blocks().eval()).attribute(_ids(), target=1))


def _hf(family: str):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    if family == "bert":
        config = BertConfig(
            vocab_size=60,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return BertForSequenceClassification(config)
    config = LlamaConfig(
        vocab_size=60,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def _hf_map(model, method=CheferRelevance):
    ids, mask = _ids(), torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0

    def forward(ids, mask):
        logits = model(input_ids=ids, attention_mask=mask).logits
        return logits if logits.dim() == 2 else logits[torch.arange(2), mask.sum(1) - 1]

    explainer = method(forward, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # training mode, without dropout
        return explainer.attribute(ids, target=1, additional_forward_args=(mask,))


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("method", [CheferRelevance, AttentionRollout, AttnLRP, CPLRP])
def test_hugging_face_gradient_checkpointing_in_training_mode_gives_the_same_map(family, method):
    """Hugging Face checkpoints only in train(): the model here has no dropout, so train and
    eval compute the same function; non-reentrant (its default) gives the same map, reentrant
    is refused naming the switch, which works."""
    plain = _hf_map(_hf(family).train(), method)
    model = _hf(family).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old name, as the issue used it
        model.gradient_checkpointing_enable()
    assert torch.equal(_hf_map(model, method), plain)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match=r"use_reentrant=True.*'use_reentrant': False"):
        _hf_map(model, method)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert torch.equal(_hf_map(model, method), plain)
    assert model.is_activation_checkpointing and model.training  # left as it was


def test_timm_grad_checkpointing_gives_the_same_map():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, img_size=32,
                              patch_size=8, num_classes=3).eval()  # fmt: skip
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain = CheferRelevance(model).attribute(pixels, target=1)
    model.set_grad_checkpointing(True)
    assert torch.equal(CheferRelevance(model).attribute(pixels, target=1), plain)


def test_checkpointing_leaves_the_model_and_other_calls_alone():
    """After an attribution through checkpointed blocks, a plain backward of the model is the
    same as on a fresh copy: nothing of the capture is left in the blocks."""
    model = Blocks("per block").eval()
    fresh = copy.deepcopy(model)
    CheferRelevance(model).attribute(_ids(), target=1)
    for one in (model, fresh):
        one(_ids())[:, 1].sum().backward()
    for ours, theirs in zip(model.parameters(), fresh.parameters()):
        assert_close(ours.grad, theirs.grad, rtol=1e-6)


def test_a_long_input_through_checkpointed_layers_is_exact_with_bert_at_sdpa():
    model = models.bert("sdpa")
    ids = torch.randint(5, 100, (1, 64), generator=torch.Generator().manual_seed(2))
    explainer = CheferRelevance(lambda i: model(i).logits, model)
    plain = explainer.attribute(ids, target=1)
    model.train()
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.activation_checkpointing_enable()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(explainer.attribute(ids, target=1), plain, rtol=1e-6)
