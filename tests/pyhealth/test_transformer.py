"""PyHealth's ``Transformer``, explained as PyHealth's users call interpreters.

Every map is checked against the float64 reference of ``ehr.py`` (PyHealth's own hooks on a
float64 copy, Chefer's rule written out), and against PyHealth's own ``CheferRelevance`` and
``AttentionRollout``, which are right on this model.
"""

from __future__ import annotations

import ehr
import pytest
import torch
from pyhealth.interpret.methods import AttentionRollout as PyHealthRollout
from pyhealth.interpret.methods import BaseInterpreter
from pyhealth.interpret.methods import CheferRelevance as PyHealthChefer

from captum_chefer.pyhealth import AttentionRollout, CheferRelevance, Interpreter


def assert_maps_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6) -> None:
    expected = expected.expand(actual.shape)  # PyHealth leaves a one-token feature (B, 1)
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, rtol=1e-5, atol=atol), (actual - expected).abs().max()


def attention_share(maps: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The map without the read token's identity 1: what attention added (row 0 is read)."""
    identity = torch.zeros_like(maps)
    identity[:, 0] = 1.0
    return maps - identity


@pytest.mark.parametrize("kind", ehr.PROCESSORS)
def test_every_processor_equals_the_float64_reference_and_pyhealth(kind: str) -> None:
    data = ehr.dataset({"codes": kind})
    model, batch = ehr.transformer(data), ehr.first_batch(data)
    value = ehr.value_of(model, "codes", batch)

    ours = CheferRelevance(model).attribute(**batch)["codes"]
    reference = ehr.hooked_reference(model, batch)["codes"]

    assert ours.shape == value.shape
    assert_maps_close(ours, reference)
    added, expected = attention_share(ours, value), attention_share(reference, value)
    assert added.abs().max() > 1e-4  # attention adds something to compare
    assert torch.allclose(added, expected, rtol=1e-4, atol=1e-7)
    assert_maps_close(ours, PyHealthChefer(model).attribute(**batch)["codes"])


@pytest.mark.parametrize("kind", ["sequence", "nested_sequence", "stagenet"])
def test_padding_is_exactly_zero(kind: str) -> None:
    data = ehr.dataset({"codes": kind}, n=8, seed=3)
    model, batch = ehr.transformer(data), ehr.first_batch(data)
    value = ehr.value_of(model, "codes", batch)
    maps = CheferRelevance(model, self_relevance="subtract")(**batch)["codes"]
    real = ehr.hooked_reference(model, batch)["codes"] != 0  # the reference's real tokens
    assert (~real).any(), "the batch must have padding"
    assert (maps[~real] == 0).all()
    assert maps.shape == value.shape


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
@pytest.mark.parametrize("target_class_idx", [None, 0, 2])
def test_classes_follow_pyhealth_conventions(task: str, target_class_idx: int | None) -> None:
    data = ehr.dataset({"codes": "sequence", "visits": "nested_sequence"}, task=task, seed=1)
    model, batch = ehr.transformer(data, seed=1), ehr.first_batch(data)
    ours = CheferRelevance(model).attribute(target_class_idx=target_class_idx, **batch)
    reference = ehr.hooked_reference(model, batch, target_class_idx)
    theirs = PyHealthChefer(model).attribute(target_class_idx=target_class_idx, **batch)
    for key in ("codes", "visits"):
        assert_maps_close(ours[key], reference[key])
        assert_maps_close(ours[key], theirs[key])


def test_none_explains_each_examples_largest_logit() -> None:
    data = ehr.dataset({"codes": "sequence"}, task="multiclass", seed=2)
    model, batch = ehr.transformer(data, seed=2), ehr.first_batch(data)
    predicted = model(**batch)["logit"].argmax(-1)
    assert predicted.unique().numel() > 1, "the examples must predict different classes"
    ours = CheferRelevance(model).attribute(**batch)["codes"]
    per_class = {
        c: CheferRelevance(model).attribute(target_class_idx=c, **batch)["codes"]
        for c in predicted.unique().tolist()
    }
    expected = torch.stack([per_class[int(c)][i] for i, c in enumerate(predicted)])
    assert torch.equal(ours, expected)


def test_a_binary_model_explains_its_one_logit_whatever_the_class() -> None:
    data = ehr.dataset({"codes": "sequence"})
    model, batch = ehr.transformer(data), ehr.first_batch(data)
    explainer = CheferRelevance(model)
    maps = [explainer.attribute(target_class_idx=c, **batch)["codes"] for c in (None, 0, 1)]
    assert torch.equal(maps[0], maps[1]) and torch.equal(maps[0], maps[2])


def test_one_transformer_per_feature_each_feature_through_its_own() -> None:
    features = {
        "conditions": "sequence",
        "procedures": "nested_sequence",
        "labs": "timeseries",
        "vitals": "stagenet_tensor",
    }
    data = ehr.dataset(features, task="multiclass", seed=4)
    model, batch = ehr.transformer(data, seed=4, layers=3), ehr.first_batch(data)
    ours = CheferRelevance(model)(**batch)
    reference = ehr.hooked_reference(model, batch)
    theirs = PyHealthChefer(model)(**batch)
    assert list(ours) == list(features)
    for key in features:
        assert ours[key].shape == ehr.value_of(model, key, batch).shape
        assert_maps_close(ours[key], reference[key])
        assert_maps_close(ours[key], theirs[key])


def test_rollout_equals_pyhealths() -> None:
    data = ehr.dataset({"codes": "sequence", "visits": "nested_sequence"}, seed=5)
    model, batch = ehr.transformer(data, seed=5), ehr.first_batch(data)
    ours = AttentionRollout(model)(**batch)
    theirs = PyHealthRollout(model).attribute(**batch)
    for key in ("codes", "visits"):
        assert_maps_close(ours[key], theirs[key])


def test_interface_is_pyhealths() -> None:
    data = ehr.dataset({"codes": "sequence"})
    model, batch = ehr.transformer(data), ehr.first_batch(data)
    explainer = CheferRelevance(model)
    assert isinstance(explainer, BaseInterpreter)
    assert torch.equal(explainer(**batch)["codes"], explainer.attribute(**batch)["codes"])
    assert repr(explainer) == "CheferRelevance(model=Transformer, method=CheferRelevance)"


def test_bad_use_names_the_fix() -> None:
    data = ehr.dataset({"codes": "sequence"})
    model, batch = ehr.transformer(data), ehr.first_batch(data)
    with pytest.raises(ValueError, match="drop output="):
        CheferRelevance(model, output="input")
    with pytest.raises(TypeError, match="attribution class of captum_chefer"):
        Interpreter(model, method=PyHealthChefer)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="get_dataloader"):
        CheferRelevance(model).attribute(label=batch["label"])
    with pytest.raises(TypeError, match="no feature_keys"):
        CheferRelevance(torch.nn.Linear(2, 2)).attribute(**batch)
    with pytest.raises(ValueError, match="one class per example"):
        data3 = ehr.dataset({"codes": "sequence"}, task="multiclass")
        CheferRelevance(ehr.transformer(data3)).attribute(
            target_class_idx=torch.tensor([0, 1]), **ehr.first_batch(data3)
        )
