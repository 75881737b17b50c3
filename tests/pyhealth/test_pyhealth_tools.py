"""PyHealth's own tools run on our interpreters unchanged; the model is left as it was; the
per-value methods (AttnLRP, CP-LRP) keep their invariances through the adapter."""

from __future__ import annotations

import copy
import math

import ehr
import pytest
import torch
from pyhealth.datasets import get_dataloader
from pyhealth.interpret.methods import AvgEnsemble, CrhEnsemble, IntegratedGradients
from pyhealth.interpret.methods import CheferRelevance as PyHealthChefer
from pyhealth.metrics.interpretability import Evaluator

from captum_chefer.pyhealth import CPLRP, AttentionRollout, AttnLRP, CheferRelevance

FEATURES = {"codes": "sequence", "visits": "nested_sequence"}


def test_evaluator_scores_ours_as_it_scores_pyhealths() -> None:
    """Equal maps, equal comprehensiveness and sufficiency, through ``evaluate_attribution``."""
    data = ehr.dataset(FEATURES, task="multiclass", n=12, seed=6)
    model = ehr.transformer(data, seed=6)
    loader = get_dataloader(data, batch_size=6, shuffle=False)
    evaluator = Evaluator(model, percentages=[10, 50])
    ours = evaluator.evaluate_attribution(loader, CheferRelevance(model))
    theirs = evaluator.evaluate_attribution(loader, PyHealthChefer(model))
    assert set(ours) == {"comprehensiveness", "sufficiency"}
    for metric, score in ours.items():
        assert math.isfinite(score)
        assert score == pytest.approx(theirs[metric], abs=1e-6)
    lrp = evaluator.evaluate_attribution(loader, AttnLRP(model, epsilon=0.0))
    assert all(math.isfinite(score) for score in lrp.values())


@pytest.mark.parametrize("ensemble", [AvgEnsemble, CrhEnsemble])
def test_pyhealth_ensembles_take_our_interpreters_as_experts(ensemble) -> None:
    data = ehr.dataset(FEATURES, seed=7)
    model, batch = ehr.transformer(data, seed=7), ehr.first_batch(data)
    experts = [
        CheferRelevance(model),
        AttnLRP(model, epsilon=0.0),
        AttentionRollout(model),
        IntegratedGradients(model, steps=4),
    ]
    consensus = ensemble(model, experts).attribute(**batch)
    for key in FEATURES:
        value = ehr.value_of(model, key, batch)
        assert consensus[key].shape == value.shape
        assert torch.isfinite(consensus[key]).all()


def _state(model: torch.nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        "attributes": [sorted(vars(m)) for m in model.modules()],
        "parameters": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": [p.grad for p in model.parameters()],
    }


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("interpreter", [CheferRelevance, AttnLRP, CPLRP, AttentionRollout])
def test_model_left_exactly_as_it_was(interpreter, training: bool) -> None:
    data = ehr.dataset(FEATURES, seed=8)
    model, batch = ehr.transformer(data, seed=8), ehr.first_batch(data)
    model.train(training)
    before = _state(model)
    options = {"epsilon": 0.0} if interpreter in (AttnLRP, CPLRP) else {}
    if training:
        with pytest.warns(UserWarning, match="training mode"):
            interpreter(model, **options)(**batch)
    else:
        interpreter(model, **options)(**batch)
    after = _state(model)
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"] and after["attributes"] == before["attributes"]
    assert all(g is None for g in after["grads"])
    for name, tensor in before["parameters"].items():
        assert torch.equal(after["parameters"][name], tensor), name


@pytest.mark.parametrize("kind", ehr.PROCESSORS)
def test_cplrp_relevance_sums_to_the_logit_of_a_bias_free_model(kind: str) -> None:
    """CP-LRP conserves relevance where no bias takes a share: summed over every value of
    every feature, it is the explained logit (float64, LRP-0)."""
    data = ehr.dataset({"codes": kind, "visits": "nested_sequence"}, seed=9)
    model, batch = ehr.transformer(data, seed=9), ehr.first_batch(data)
    model = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
    batch = {key: ehr.as_float64(value) for key, value in batch.items()}
    maps = CPLRP(model, epsilon=0.0)(**batch)
    for key in maps:
        assert maps[key].shape == ehr.value_of(model, key, batch).shape
    total = sum(m.flatten(1).sum(1) for m in maps.values())
    logits = model(**batch)["logit"][:, 0]
    assert torch.allclose(total, logits, rtol=1e-9, atol=1e-12)


def test_attnlrp_gives_each_code_its_own_relevance_and_padding_zero() -> None:
    data = ehr.dataset({"visits": "nested_sequence"}, seed=10)
    model, batch = ehr.transformer(data, seed=10), ehr.first_batch(data)
    codes = batch["visits"]
    maps = AttnLRP(model, epsilon=0.0)(**batch)["visits"]
    assert (codes == 0).any()
    assert (maps[codes == 0] == 0).all()
    assert maps[codes != 0].abs().min() > 0
    visits_with_two = [(b, v) for b, v in zip(*torch.where((codes != 0).sum(-1) >= 2))]
    b, v = visits_with_two[0]
    real = maps[b, v][codes[b, v] != 0]
    assert real.unique().numel() == real.numel()  # not the visit's value copied


def test_attnlrp_default_epsilon_names_the_fix_that_works() -> None:
    """PyHealth's feed-forward zeroes padded rows in place after its linear layer; the epsilon
    rule needs that layer's output, and the error names ``epsilon=0``, which works."""
    data = ehr.dataset(FEATURES, seed=11)
    model, batch = ehr.transformer(data, seed=11), ehr.first_batch(data)
    with pytest.raises(RuntimeError, match="epsilon=0"):
        AttnLRP(model)(**batch)
    maps = AttnLRP(model, epsilon=0)(**batch)
    assert all(torch.isfinite(m).all() for m in maps.values())
