"""Captum's conventions, batch and padding invariance, and the model left exactly as it was."""

from __future__ import annotations

import copy

import models
import pytest
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, NoiseTunnel
from captum.attr import visualization as viz
from captum.metrics import infidelity, sensitivity_max
from reference import assert_close

from captum_chefer import CheferRelevance


def _bert_forward(model):
    return lambda ids, mask: model(ids, attention_mask=mask).logits


def _ids(batch=3, size=9, seed=1):
    return torch.randint(5, 100, (batch, size), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("target", [[0, 2, 1], torch.tensor([0, 2, 1])])
def test_per_example_targets_equal_separate_calls(target):
    model = models.bert()
    ids, mask = _ids(), torch.ones(3, 9, dtype=torch.long)
    explainer = CheferRelevance(_bert_forward(model), model)
    batched = explainer.attribute(ids, target, (mask,))
    for i, t in enumerate([0, 2, 1]):
        single = explainer.attribute(ids[i : i + 1], t, (mask[i : i + 1],))
        assert_close(batched[i : i + 1], single, rtol=1e-5)


def test_target_none_explains_the_argmax_and_scalar_outputs_themselves():
    model = models.bert()
    ids, mask = _ids(), torch.ones(3, 9, dtype=torch.long)
    explainer = CheferRelevance(_bert_forward(model), model)
    predicted = _bert_forward(model)(ids, mask).argmax(1)
    assert torch.equal(
        explainer.attribute(ids, None, (mask,)), explainer.attribute(ids, predicted, (mask,))
    )
    scalar = CheferRelevance(lambda i, m: model(i, attention_mask=m).logits[:, 1], model)
    assert_close(scalar.attribute(ids, None, (mask,)), explainer.attribute(ids, 1, (mask,)), 1e-6)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_padding_gets_zero_and_leaves_real_tokens_unchanged(attn_implementation):
    # At 'eager' this also catches a padding mask silently dropped by the attention switch.
    model = models.bert(attn_implementation)
    explainer = CheferRelevance(_bert_forward(model), model)
    ids = _ids(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    padded = explainer.attribute(ids, [1, 2], (mask,))
    alone = explainer.attribute(ids[1:, :5], 2, (mask[1:, :5],))
    assert (padded[1, 5:] == 0).all()
    assert_close(padded[1:, :5], alone, rtol=1e-5)
    assert (padded[1, :5].abs() > 0).all()


def _mean_pooled(model):
    """A sentence-encoder head: the masked mean of BERT's final states, then the classifier."""

    def forward(ids, mask):
        states = model.bert(ids, attention_mask=mask).last_hidden_state
        weights = mask[..., None].to(states.dtype)
        return model.classifier((states * weights).sum(1) / weights.sum(1))

    return forward


@pytest.mark.parametrize("token_index", ["mean", "auto"])
def test_mean_is_the_mean_of_the_single_rows_of_the_tokens_pooled(token_index):
    """A masked mean pooling: "mean" (and "auto", which sees that the rows are weighed alike)
    read the mean of the real tokens' rows, whatever the padding."""
    model = models.bert()
    ids, mask = _ids(2, 6), torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    explainer = CheferRelevance(_mean_pooled(model), model)
    single = [
        explainer.attribute(ids, 0, (mask,), token_index=i, self_relevance="keep") for i in range(4)
    ]
    mean = explainer.attribute(ids, 0, (mask,), token_index=token_index, self_relevance="keep")
    assert_close(mean[1:], torch.stack(single).mean(0)[1:], rtol=1e-5)
    assert (mean[1, 4:] == 0).all()


def test_tuple_inputs_give_tuple_outputs():
    model = models.EncoderClassifier().eval()
    x = torch.randn(2, 6, 16)
    explainer = CheferRelevance(lambda a, b: model(a + b), model)
    out = explainer.attribute((x, torch.zeros_like(x)), target=1)
    assert isinstance(out, tuple) and len(out) == 2
    assert torch.equal(out[0], out[1]) and out[0].shape == x.shape
    assert torch.equal(out[0], explainer.attribute((x, torch.zeros_like(x)), target=1)[0])


def test_works_inside_no_grad():
    model = models.EncoderClassifier().eval()
    x = torch.randn(2, 6, 16)
    explainer = CheferRelevance(model)
    expected = explainer.attribute(x, target=1)
    with torch.no_grad():
        assert torch.equal(explainer.attribute(x, target=1), expected)


def _state(model):
    return {
        "sdpa": F.scaled_dot_product_attention,
        "fastpath": torch.backends.mha.get_fastpath_enabled(),
        "training": [m.training for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        "dicts": [sorted(vars(m)) for m in model.modules()],
        "grads": [p.grad for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
        "attn": [
            getattr(getattr(m, "config", None), "_attn_implementation", None)
            for m in model.modules()
        ],
        "fused": [getattr(m, "fused_attn", None) for m in model.modules()],
    }


def _assert_same_state(before, after):
    plain = lambda state: {k: v for k, v in state.items() if k != "params"}  # noqa: E731
    assert plain(before) == plain(after)
    assert all(torch.equal(a, b) for a, b in zip(before["params"], after["params"]))


@pytest.mark.parametrize(
    "factory", [lambda: models.bert("eager"), models.deit, models.EncoderClassifier]
)
@pytest.mark.parametrize("training", [False, True])
def test_model_left_exactly_as_it_was(factory, training):
    model = factory().train(training)
    if isinstance(model, models.EncoderClassifier):
        call, inputs = model, torch.randn(2, 5, 16)
    elif hasattr(model, "blocks"):
        for block in model.blocks[:1]:
            block.attn.fused_attn = False
        call, inputs = model, torch.randn(1, 3, 224, 224)
    else:
        call, inputs = (lambda ids: model(ids).logits), _ids(2, 6)
    before = _state(model)
    with pytest.warns(UserWarning, match="training mode") if training else _no_warning():
        CheferRelevance(call, model).attribute(inputs, target=0, token_index=0)
    _assert_same_state(before, _state(model))

    def failing(x):
        call(x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        CheferRelevance(failing, model).attribute(inputs, target=0)
    _assert_same_state(before, _state(model))


class _no_warning:
    def __enter__(self):
        import warnings

        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._catcher.__exit__(*exc)


def test_nothing_captured_is_a_clear_error():
    model = models.UnmarkedModel().eval()
    with pytest.raises(RuntimeError, match="No attention was captured.*mark_attention"):
        CheferRelevance(model).attribute(torch.tensor([[1, 2, 3]]), target=0)


def test_plain_callable_without_model_still_captures_sdpa():
    model = models.EncoderClassifier().eval()
    x = torch.randn(2, 5, 16)
    expected = CheferRelevance(model).attribute(x, target=2)
    assert torch.equal(CheferRelevance(lambda t: model(t)).attribute(x, target=2), expected)


def test_captum_metrics_and_noise_tunnel_accept_the_outputs():
    model = models.EncoderClassifier().eval()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    explainer = CheferRelevance(model)
    attributions = explainer.attribute(x, target=1)

    def perturb(inputs):
        noise = 0.01 * torch.randn_like(inputs)
        return noise, inputs - noise

    score = infidelity(model, perturb, x, attributions, target=1)
    assert score.shape == (3,) and torch.isfinite(score).all()
    sensitivity = sensitivity_max(explainer.attribute, x, target=1, n_perturb_samples=2)
    assert sensitivity.shape == (3,) and torch.isfinite(sensitivity).all()
    smooth = NoiseTunnel(explainer).attribute(
        x, nt_type="smoothgrad", nt_samples=3, stdevs=1e-4, target=1
    )
    assert_close(smooth, attributions, rtol=1e-2)
    ig = IntegratedGradients(model).attribute(x, target=1, n_steps=4)
    assert ig.shape == attributions.shape


def test_visualize_image_attr_accepts_image_maps():
    import matplotlib

    matplotlib.use("Agg")
    model = models.vit()
    images = torch.rand(1, 3, 32, 32)
    relevance = CheferRelevance(lambda x: model(x).logits, model).attribute(images, target=0)
    figure, _ = viz.visualize_image_attr(
        relevance[0].permute(1, 2, 0).numpy(),
        images[0].permute(1, 2, 0).numpy(),
        method="blended_heat_map",
        sign="positive",
        use_pyplot=False,
    )
    assert figure is not None


def test_explicit_prefix_and_grid_equal_the_inferred_ones():
    model = models.deit()
    images = torch.randn(1, 3, 224, 224)
    explainer = CheferRelevance(model)
    inferred = explainer.attribute(images, target=0, token_index=0)
    explicit = explainer.attribute(
        images, target=0, token_index=0, num_prefix_tokens=2, patch_grid=(14, 14)
    )
    assert torch.equal(inferred, explicit)
    with pytest.raises(ValueError, match="patch_grid"):
        explainer.attribute(
            images, target=0, token_index=0, num_prefix_tokens=2, patch_grid=(10, 10)
        )


def test_bad_arguments_name_the_fix():
    model = models.EncoderClassifier().eval()
    explainer = CheferRelevance(model)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="token_index"):
        explainer.attribute(x, target=0, token_index="first")
    with pytest.raises(ValueError, match="mode"):
        explainer.attribute(x, target=0, mode="fast")
    with pytest.raises(ValueError, match="output"):
        explainer.attribute(x, target=0, output="pixels")
    with pytest.raises(ValueError, match="one index per example"):
        explainer.attribute(x, target=0, token_index=torch.tensor([0, 1, 2]))


def test_deepcopy_of_explainer_target_model_is_not_needed():
    # The explainer holds the model; attributing twice gives identical results.
    model = models.HandModel().eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    explainer = CheferRelevance(model)
    assert torch.equal(explainer.attribute(ids, target=1), explainer.attribute(ids, target=1))
    assert copy.deepcopy(model) is not None
