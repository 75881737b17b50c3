"""``TorchvisionModel``'s ViT (explained; PyHealth refuses it) and ``StageAttentionNet`` (Chefer
refused for its token mixing outside attention, AttnLRP the working method)."""

from __future__ import annotations

import ehr
import pytest
import torch
from pyhealth.interpret.methods import CheferRelevance as PyHealthChefer

from captum_chefer.pyhealth import AttnLRP, CheferRelevance


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """PyHealth's ``TorchvisionModel("vit_b_16")`` on 32×32 PNGs read by its image processor,
    its encoder cut to 2 of its 12 blocks to keep the test fast (the blocks are torchvision's)."""
    data = ehr.image_dataset(tmp_path_factory.mktemp("images"))
    model = ehr.torchvision_vit(data)
    model.model.encoder.layers = model.model.encoder.layers[:2]
    return model, ehr.first_batch(data, 4)


@pytest.mark.parametrize("target_class_idx", [None, 1])
def test_vit_equals_the_float64_reference(vit, target_class_idx) -> None:
    model, batch = vit
    maps = CheferRelevance(model).attribute(target_class_idx=target_class_idx, **batch)
    reference = ehr.vit_reference(model.model, batch["image"], target_class_idx)
    assert maps["image"].shape == batch["image"].shape
    assert reference.abs().max() > 1e-3
    assert torch.allclose(maps["image"], reference, rtol=1e-4, atol=1e-7)


def test_vit_has_no_logit_in_its_output_and_is_read_where_its_probabilities_are_made(vit):
    model, batch = vit
    assert "logit" not in model(**batch)  # TorchvisionModel returns loss, y_prob, y_true
    with pytest.raises(ValueError, match="CheferInterpretable"):
        PyHealthChefer(model)  # PyHealth's class refuses the ViT its docs show
    maps = AttnLRP(model).attribute(**batch)
    assert maps["image"].shape == batch["image"].shape


def stagenet_data(kind: str):
    data = ehr.dataset({"labs": kind}, seed=12)
    return data, ehr.stage_attention_net(data, seed=12), ehr.first_batch(data)


@pytest.mark.parametrize("kind", ["stagenet_tensor", "stagenet", "stagenet_nested"])
def test_stagenet_chefer_is_refused_with_the_fix_that_works(kind: str) -> None:
    data, model, batch = stagenet_data(kind)
    with pytest.raises(ValueError) as refusal:
        CheferRelevance(model)(**batch)
    message = str(refusal.value)
    assert "token mixing outside attention" in message
    assert "cumsum" in message and "conv1d" in message
    assert "captum_chefer.pyhealth.AttnLRP(model)" in message
    maps = AttnLRP(model)(**batch)["labs"]
    value = ehr.value_of(model, "labs", batch)
    assert maps.shape == value.shape and torch.isfinite(maps).all()
    assert (maps[value == 0] == 0).all()  # padding and zero values carry no relevance
    assert maps.abs().sum() > 0


def test_pyhealth_crashes_on_flat_stagenet_codes() -> None:
    """The reproduction in docs/PYHEALTH.md: PyHealth's own class on flat codes."""
    data, model, batch = stagenet_data("stagenet")
    with pytest.raises(IndexError):
        PyHealthChefer(model).attribute(**batch)


def test_pyhealth_reads_the_last_real_visit_where_the_model_reads_the_last_position() -> None:
    """For ``stagenet_tensor`` labs, StageAttentionNet builds its mask from the *embedded*
    values: a zero-padded lab vector embeds to the Linear layer's bias, so every position is a
    visit to the model, which reads position T−1 (its prediction for a patient changes when the
    batch pads them). PyHealth's map reads the row of the last real visit."""
    data, model, batch = stagenet_data("stagenet_tensor")
    times, labs = batch["labs"]
    real = labs.abs().sum(-1) != 0
    short = int((real.sum(1) < labs.shape[1]).nonzero()[0])
    length = int(real[short].sum())
    alone = {**batch, "labs": (times[short : short + 1, :length], labs[short : short + 1, :length])}
    alone["label"] = batch["label"][short : short + 1]
    alone["patient_id"] = batch["patient_id"][short : short + 1]
    with torch.no_grad():
        padded_logit = model(**batch)["logit"][short]
        alone_logit = model(**alone)["logit"][0]
    assert (padded_logit - alone_logit).abs().max() > 1e-4  # the model uses the padded visits

    layers, _ = ehr.hooked_layers(model, batch)
    relevance = ehr.chefer_rows(layers["labs"])
    theirs = PyHealthChefer(model).attribute(**batch)["labs"][short, :, 0]
    assert torch.allclose(theirs.double(), relevance[short, length - 1], atol=1e-6)
    assert not torch.allclose(theirs.double(), relevance[short, -1], atol=1e-3)
