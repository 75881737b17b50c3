"""No avoidable host synchronisation, and no device mixing, on the attribution path.

Every class and metric runs on tensors that hold CPU data but report another device
(:mod:`device_sim`), where each read of a device value on the host (``.item()``, ``bool()``,
``nonzero``, a copy to the host), each upload of host data and each operation mixing devices
is recorded with the line that caused it. A GPU stalls at each sync; a new one fails here.

The syncs the package may make are listed by site below. They are the checks that must read
the device to refuse bad input, merged into one per call:

- ``capture/recorder.py read_flags``: whether a masked call may have a fully masked query row
  (its softmax is then NaN, read as 0), for every call at once, before the backward;
- ``attr/reads.py check``: the checks on the rows read (a non-finite output, an example
  without a row, rows weighed unequally, an index out of range or on padding);
- ``metrics/_features.py rank_features``: a NaN in the attributions.

A model's own syncs (Hugging Face's mask code reads a value) are the model's, listed apart.
"""

from __future__ import annotations

import copy

import models
import pytest
import torch
from device_sim import on_device, simulated_device, to_device
from torch import nn

from captum_chefer import (
    CPLRP,
    AttentionGradCAM,
    AttentionRollout,
    AttnLRP,
    CheferDualEncoder,
    CheferEncoderDecoder,
    CheferRelevance,
    GradientRollout,
    RawAttention,
)
from captum_chefer import metrics as M

INHERENT = {
    "capture/recorder.py": "read_flags",
    "attr/reads.py": "check",
    "metrics/_features.py": "rank_features",
}
"""The sites allowed to read the device, by file and function."""


def _ours(recording, kind: str) -> list[str]:
    return [site for site in recording.sites(kind) if not site.startswith("model:")]


def _check(recording, most: int) -> None:
    syncs = _ours(recording, "sync")
    assert len(syncs) <= most, f"{len(syncs)} host syncs (at most {most}): {syncs}"
    for site in syncs:
        path, function = site.split(":")[0], site.split()[-1]
        assert INHERENT.get(path) == function, f"a sync outside the inherent checks: {site}"
    assert _ours(recording, "upload") == [], _ours(recording, "upload")
    assert recording.sites("mix") == [], recording.sites("mix")


def _bert(layers: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
    )
    return BertForSequenceClassification(config).eval()


def _on_device(model: nn.Module, *tensors: torch.Tensor):
    with simulated_device():
        return (to_device(copy.deepcopy(model)), *(on_device(t) for t in tensors))


def _text():
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask


ONE_STREAM = [CheferRelevance, RawAttention, AttentionRollout, AttentionGradCAM, GradientRollout]


@pytest.mark.parametrize("method", ONE_STREAM)
@pytest.mark.parametrize("layers", [2, 6])
def test_bert_syncs_at_most_twice_whatever_the_depth(layers, method):
    model, ids, mask = _on_device(_bert(layers), *_text())
    explainer = method(lambda i, m: model(i, attention_mask=m).logits, model)
    with simulated_device() as recording:
        explainer.attribute(ids, 1, (mask,))
    _check(recording, 2)


def test_the_simulated_device_gives_the_cpu_map():
    """The counts are of the real computation: the map on the simulated device is the CPU's."""
    model = _bert(2)
    ids, mask = _text()
    expected = CheferRelevance(lambda i, m: model(i, attention_mask=m).logits, model).attribute(
        ids, 1, (mask,)
    )
    device_model, device_ids, device_mask = _on_device(model, ids, mask)
    with simulated_device():
        ours = CheferRelevance(
            lambda i, m: device_model(i, attention_mask=m).logits, device_model
        ).attribute(device_ids, 1, (device_mask,))
    assert torch.allclose(ours.data_, expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("method", [CheferRelevance, AttentionRollout, AttnLRP, CPLRP])
def test_causal_lm_syncs_at_most_twice(method):
    ids, mask = _text()
    model, ids, mask = _on_device(models.llama(), ids, mask)

    def forward(i, m):
        return model(input_ids=i, attention_mask=m).logits[:, -1]

    with simulated_device() as recording:
        method(forward, model).attribute(ids, 7, (mask,))
    _check(recording, 0 if method in (AttnLRP, CPLRP) else 2)


@pytest.mark.parametrize("method", [CheferRelevance, AttentionRollout, AttnLRP])
def test_vit_syncs_at_most_twice(method):
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model, pixels = _on_device(models.vit(), pixels)
    with simulated_device() as recording:
        method(lambda x: model(pixel_values=x).logits, model).attribute(pixels, 1)
    _check(recording, 0 if method is AttnLRP else 2)


def test_multimodal_classes_sync_at_most_twice():
    bart = models.bart()
    ids, _ = _text()
    bart, ids = _on_device(bart, ids % 90)
    with simulated_device() as recording:
        CheferEncoderDecoder(
            lambda i, d: bart(input_ids=i, decoder_input_ids=d).logits[:, -1], bart
        ).attribute((ids, ids[:, :4]), target=7)
    _check(recording, 2)


def test_dual_encoder_syncs_at_most_twice():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tower = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    config = CLIPConfig(
        text_config=dict(vocab_size=50, eos_token_id=2, **tower),
        vision_config=dict(image_size=16, patch_size=8, **tower),
    )
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    texts = torch.randint(3, 50, (2, 5), generator=torch.Generator().manual_seed(4))
    model, images, texts = _on_device(CLIPModel(config).eval(), images, texts)
    with simulated_device() as recording:
        CheferDualEncoder(model).attribute((images, texts))
    _check(recording, 2)


def _metric_inputs():
    torch.manual_seed(0)
    image_model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()
    text_model = nn.Sequential(nn.Embedding(20, 5), nn.Flatten(), nn.Linear(30, 3)).eval()
    generator = torch.Generator().manual_seed(5)
    pixels, maps = torch.rand(2, 3, 8, 8, generator=generator), torch.rand(2, 3, 8, 8)
    objects = (torch.rand(2, 8, 8, generator=generator) > 0.5).long()
    ids = torch.randint(1, 20, (2, 6), generator=generator)
    relevance, mask = torch.rand(2, 6, generator=generator), torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    with simulated_device():
        return (
            to_device(image_model),
            to_device(text_model),
            *(on_device(t) for t in (pixels, maps, objects, ids, relevance, mask)),
        )


METRICS = {
    "perturbation_curve": lambda m, t, x, a, o, i, r, k: M.perturbation_curve(m, x, a, target=1),
    "perturbation_auc": lambda m, t, x, a, o, i, r, k: M.perturbation_auc(
        M.perturbation_curve(m, x, a, target=1)
    ),
    "deletion_auc": lambda m, t, x, a, o, i, r, k: M.deletion_auc(
        M.deletion_curve(m, x, a, target=1)
    ),
    "insertion_auc": lambda m, t, x, a, o, i, r, k: M.insertion_auc(
        M.insertion_curve(m, x, a, target=1)
    ),
    "comprehensiveness": lambda m, t, x, a, o, i, r, k: M.comprehensiveness(
        t, i, r, target=1, attention_mask=k
    ),
    "sufficiency": lambda m, t, x, a, o, i, r, k: M.sufficiency(
        t, i, r, target=1, attention_mask=k
    ),
    "pointing_game": lambda m, t, x, a, o, i, r, k: M.pointing_game(a, o),
    "segmentation_scores": lambda m, t, x, a, o, i, r, k: M.segmentation_scores(a, o),
    "average_precision": lambda m, t, x, a, o, i, r, k: M.average_precision(r, k),
    "token_f1": lambda m, t, x, a, o, i, r, k: M.token_f1(r, k),
}


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_metric_syncs_at_most_once(name):
    arguments = _metric_inputs()
    with simulated_device() as recording:
        METRICS[name](*arguments)
    _check(recording, 1)


def test_the_harness_catches_each_kind_of_event():
    """The recording can fail: a sync, an upload and a device mix are each seen."""
    with simulated_device():
        x = on_device(torch.ones(3))
    with simulated_device() as recording:
        bool(x.sum() > 0)
        torch.tensor([1.0, 2.0], device=x.device)
        x + torch.ones(3)
    kinds = [event.kind for event in recording.events]
    assert kinds.count("sync") == 1 and kinds.count("upload") == 1 and kinds.count("mix") == 1


def test_the_gpu_script_runs_its_cpu_smoke_path(tmp_path):
    """``benchmarks/gpu_check.py --device cpu --quick`` runs every stage's code on the CPU (the
    lent GPU runs the same script); the split and checkpointed maps equal the plain ones."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_check

    gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path),
                    "--stages", "syncs", "split", "checkpointing"])  # fmt: skip
    found = json.loads((tmp_path / "gpu_check.json").read_text())
    split = {name: entry for name, entry in found["split"].items() if name != "seconds"}
    assert set(split) == {"CheferRelevance", "AttnLRP"}
    assert all(entry["equal within 1e-5"] for entry in split.values())
    assert found["checkpointing"]["max rel diff ckpt vs plain"] <= 1e-6
    assert "error" not in found["syncs"]
