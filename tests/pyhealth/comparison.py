"""The table of docs/PYHEALTH.md: model × feature → PyHealth's map, ours, the float64 reference.

Run in the PyHealth environment: ``.venv-pyhealth/bin/python tests/pyhealth/comparison.py``.
Each row explains one seeded random model's first batch (8 patients, or 4 images) with
PyHealth's ``CheferRelevance``, ours (``captum_chefer.pyhealth.CheferRelevance``) and the
reference of ``ehr.py``; the differences are the largest absolute ones over the batch, next to
the largest value of the reference's attention share (the map minus the read token's identity
1), which is what the rule adds. The claims are asserted by the tests beside this file.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ehr  # noqa: E402
from pyhealth.interpret.methods import CheferRelevance as PyHealthChefer  # noqa: E402
from pyhealth.interpret.methods.chefer import _reference_attribute_vit  # noqa: E402

from captum_chefer.pyhealth import CheferRelevance  # noqa: E402


def gap(actual: torch.Tensor, expected: torch.Tensor) -> str:
    actual, expected = torch.broadcast_tensors(actual, expected)  # PyHealth's one-token (B, 1)
    return f"{float((actual - expected).abs().max()):.1e}"


def share(rows: torch.Tensor) -> str:
    """The largest entry of the read rows ``R[:, 0]`` without the identity's 1."""
    added = rows.clone()
    added[:, 0] -= 1.0
    return f"{float(added.abs().max()):.1e}"


def transformer_rows() -> list[list[str]]:
    rows = []
    cases = [({"x": kind}, "binary") for kind in ehr.PROCESSORS]
    cases.append(({"conditions": "sequence", "visits": "nested_sequence"}, "multiclass"))
    cases.append(({"conditions": "sequence", "visits": "nested_sequence"}, "multilabel"))
    four = {"cond": "sequence", "proc": "nested_sequence", "lab": "timeseries"}
    cases.append(({**four, "vital": "stagenet_tensor"}, "binary"))
    for features, task in cases:
        data = ehr.dataset(features, task=task)
        model, batch = ehr.transformer(data), ehr.first_batch(data)
        ours, theirs = CheferRelevance(model)(**batch), PyHealthChefer(model)(**batch)
        reference = ehr.hooked_reference(model, batch)
        layers, _ = ehr.hooked_layers(model, batch)
        for key, kind in features.items():
            more = f", with {len(features) - 1} more" if len(features) > 1 else ""
            name = f"{kind} ({task}{more})"
            rows.append(
                [
                    "Transformer",
                    name,
                    f"right: {gap(theirs[key], reference[key])}",
                    gap(ours[key], reference[key]),
                    share(ehr.chefer_rows(layers[key])[:, 0]),
                ]
            )
    return rows


def vit_rows() -> list[list[str]]:
    folder = Path(tempfile.mkdtemp())
    data = ehr.image_dataset(folder)
    model, batch = ehr.torchvision_vit(data), ehr.first_batch(data, 4)
    ours = CheferRelevance(model)(**batch)["image"]
    reference = ehr.vit_reference(model.model, batch["image"], None)
    legacy = _reference_attribute_vit(model, **batch)["image"]
    try:
        PyHealthChefer(model)
        refused = "runs"
    except ValueError as error:
        refused = f"refused ({error})"
    scale = f"{float(reference.abs().max()):.1e}"
    return [
        [
            "TorchvisionModel vit_b_16, 32×32",
            "image",
            f"{refused}; its leftover ViT path: {gap(legacy, reference[:, :1])}",
            gap(ours, reference),
            scale,
        ]
    ]


def stagenet_rows() -> list[list[str]]:
    rows = []
    for kind in ("stagenet_tensor", "stagenet", "stagenet_nested"):
        data = ehr.dataset({"labs": kind}, seed=12)
        model, batch = ehr.stage_attention_net(data, seed=12), ehr.first_batch(data)
        try:
            CheferRelevance(model)(**batch)
            ours = "runs"
        except ValueError:
            ours = "refused: token mixing outside attention (names AttnLRP)"
        try:
            theirs = PyHealthChefer(model)(**batch)["labs"]
        except IndexError as error:
            rows.append(["StageAttentionNet", kind, f"IndexError ({error})", ours, "-"])
            continue
        if kind == "stagenet_nested":  # padded visits embed to 0: the model reads the last real
            verdict = "reads the row the model reads (its last real visit)"
        else:  # padded lab vectors embed to the bias: to the model all T visits are real
            layers, _ = ehr.hooked_layers(model, batch)
            read = ehr.spread(ehr.chefer_rows(layers["labs"])[:, -1], theirs).float()
            verdict = (
                f"reads the last real visit; vs the row T−1 the model reads: {gap(theirs, read)}"
            )
        rows.append(["StageAttentionNet", kind, verdict, ours, "rule undefined (mixing)"])
    return rows


def main() -> None:
    warnings.filterwarnings("ignore")
    header = [
        "model",
        "feature (task)",
        "PyHealth's CheferRelevance (max abs. difference to the reference)",
        "ours − reference",
        "reference's attention share",
    ]
    rows = transformer_rows() + vit_rows() + stagenet_rows()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
