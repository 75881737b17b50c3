# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Tutorial 4: PyHealth's models, explained as PyHealth users call them
#
# [PyHealth](https://pyhealth.readthedocs.io) calls an interpreter as
# `interpreter.attribute(**batch)` and gets `{feature_key: relevance shaped like that feature's
# values}`; its `Evaluator` (comprehensiveness, sufficiency) and its ensembles work on that.
# `captum_chefer.pyhealth` gives every method of this package that shape, so a PyHealth user
# swaps one import:
#
# ```python
# from captum_chefer.pyhealth import CheferRelevance  # was: from pyhealth.interpret.methods
# ```
#
# This tutorial trains PyHealth's `Transformer` on a synthetic EHR task whose label is set by
# known codes, explains it with our Chefer and AttnLRP beside PyHealth's own `CheferRelevance`,
# Integrated Gradients and attention rollout, and scores them with PyHealth's `Evaluator` and
# against the known codes. It needs Python >= 3.12 with `pyhealth==2.1.0`
# (`bash tests/pyhealth/run.sh` makes that environment as `.venv-pyhealth`):
# `.venv-pyhealth/bin/python tutorials/04_pyhealth.py`. Nothing is downloaded.
# `CAPTUM_CHEFER_QUICK=1` runs a small version; figures go to `$CAPTUM_CHEFER_TUTORIAL_OUT`
# (default `tutorial_output/`).

# %%
import os
import random
import sys
import warnings
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from pyhealth.datasets import create_sample_dataset, get_dataloader
from pyhealth.interpret import methods as pyhealth_methods
from pyhealth.metrics.interpretability import Evaluator
from pyhealth.models import Transformer

from captum_chefer import pyhealth as ours

warnings.filterwarnings("ignore", message=".*does not have mask.*")
QUICK = os.environ.get("CAPTUM_CHEFER_QUICK") == "1"
OUT = Path(os.environ.get("CAPTUM_CHEFER_TUTORIAL_OUT", "tutorial_output"))
OUT.mkdir(parents=True, exist_ok=True)
print(f"outputs go to {OUT.resolve()}")
torch.manual_seed(0)


def wrote(path):
    print(f"wrote {path}")
    return path


def finish(figure):
    """Show the figure in a notebook, then close it (a script only writes the file)."""
    if "ipykernel" in sys.modules:
        from IPython.display import display

        display(figure)
    plt.close(figure)


# %% [markdown]
# ## 1. A synthetic EHR task with known answers
#
# Each patient has a flat list of **conditions** (`sequence`) and **procedures** grouped by
# visit (`nested_sequence`). A patient is positive exactly when one *signal* code appears:
# condition `I50` or procedure `0JH6`, in a random position among random other codes. So for a
# positive patient we know which code the prediction rests on.

# %%
SIGNAL_CONDITION, SIGNAL_PROCEDURE = "I50", "0JH6"
CONDITIONS = [f"C{i:02d}" for i in range(40)]
PROCEDURES = [f"P{i:02d}" for i in range(30)]


def patient(index, rng):
    conditions = rng.sample(CONDITIONS, rng.randint(2, 7))
    visits = [rng.sample(PROCEDURES, rng.randint(1, 3)) for _ in range(rng.randint(1, 4))]
    positive = index % 2 == 1
    if positive and rng.random() < 0.5:
        conditions.insert(rng.randrange(len(conditions) + 1), SIGNAL_CONDITION)
    elif positive:
        rng.choice(visits).insert(0, SIGNAL_PROCEDURE)
    return {
        "patient_id": f"patient-{index}",
        "conditions": conditions,
        "procedures": visits,
        "label": int(positive),
    }


rng = random.Random(0)
patients = [patient(i, rng) for i in range(400 if QUICK else 2000)]
dataset = create_sample_dataset(
    patients,
    input_schema={"conditions": "sequence", "procedures": "nested_sequence"},
    output_schema={"label": "binary"},
    dataset_name="synthetic_ehr",
)
n_test = 64 if QUICK else 200
train = torch.utils.data.Subset(dataset, range(len(patients) - n_test))
test = torch.utils.data.Subset(dataset, range(len(patients) - n_test, len(patients)))
print(f"{len(train)} training and {len(test)} held-out patients")

# %% [markdown]
# ## 2. PyHealth's `Transformer`, trained a little
#
# One transformer per feature, each read at its first position, concatenated for the head.

# %%
model = Transformer(dataset, embedding_dim=32, heads=2, dropout=0.1, num_layers=2)
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
for _epoch in range(5 if QUICK else 10):
    model.train()
    for batch in get_dataloader(train, batch_size=32, shuffle=True):
        optimizer.zero_grad()
        model(**batch)["loss"].backward()
        optimizer.step()
model.eval()  # captum_chefer never changes the mode: explain in eval mode


def accuracy(loader):
    right = total = 0
    with torch.no_grad():
        for batch in loader:
            predicted = model(**batch)["y_prob"][:, 0] > 0.5
            right += int((predicted == batch["label"][:, 0].bool()).sum())
            total += len(predicted)
    return right / total


held_out = accuracy(get_dataloader(test, batch_size=64))
print(f"held-out accuracy: {held_out:.3f} (chance: 0.5)")
if held_out < 0.8:
    print("The model barely beats chance: the maps below show the mechanics, not explanations.")

# %% [markdown]
# ## 3. Five interpreters, one call each
#
# Ours and PyHealth's take the same arguments and return the same dict. Chefer's map equals
# PyHealth's here (PyHealth's class is right on this model): both return the raw row
# `R[:, 0]`, so the read code (the first condition, the first visit) carries the identity's 1.
# `self_relevance="subtract"` removes that share and keeps what attention added. AttnLRP is
# per code; the Chefer and rollout maps are per visit, spread over the visit's codes.

# %%
interpreters = {
    "Chefer (ours)": ours.CheferRelevance(model),
    "Chefer, identity removed (ours)": ours.CheferRelevance(model, self_relevance="subtract"),
    "AttnLRP (ours)": ours.AttnLRP(model, epsilon=0.0),
    "Chefer (PyHealth)": pyhealth_methods.CheferRelevance(model),
    "Integrated Gradients (PyHealth)": pyhealth_methods.IntegratedGradients(
        model, steps=8 if QUICK else 32
    ),
    "Rollout (PyHealth)": pyhealth_methods.AttentionRollout(model),
}
batch = next(iter(get_dataloader(test, batch_size=len(test))))
maps = {name: interpreter.attribute(**batch) for name, interpreter in interpreters.items()}
gap = (maps["Chefer (ours)"]["procedures"] - maps["Chefer (PyHealth)"]["procedures"]).abs().max()
print(f"ours vs PyHealth's Chefer, largest difference: {float(gap):.1e}")
for key, value in maps["AttnLRP (ours)"].items():
    print(f"{key}: codes {tuple(batch[key].shape)}, relevance {tuple(value.shape)}")

# %% [markdown]
# ## 4. Scored against the known codes
#
# For each positive held-out patient: does the highest-scoring real code (over both features)
# hold the signal? Ties count fractionally (a visit-level map ties a visit's codes). Chance is
# one over the number of codes.


# %%
def pointing(relevance, batch):
    hits = []
    for i in torch.where(batch["label"][:, 0] == 1)[0].tolist():
        scores, signal = [], []
        for key, code in (("conditions", SIGNAL_CONDITION), ("procedures", SIGNAL_PROCEDURE)):
            ids = batch[key][i].flatten()
            real = ids != 0
            scores.append(relevance[key][i].flatten()[real])
            signal.append(ids[real] == dataset.input_processors[key].code_vocab[code])
        scores, signal = torch.cat(scores), torch.cat(signal)
        top = scores == scores.max()
        hits.append(float((top & signal).sum() / top.sum()))
    return sum(hits) / len(hits)


chance = []
for i in torch.where(batch["label"][:, 0] == 1)[0].tolist():
    chance.append(1 / sum(int((batch[key][i] != 0).sum()) for key in ("conditions", "procedures")))
print(f"{'pointing at the signal code':>40}: chance {sum(chance) / len(chance):.2f}")
for name, relevance in maps.items():
    print(f"{name:>40}: {pointing(relevance, batch):.2f}")

# %% [markdown]
# ## 5. Scored by PyHealth's `Evaluator`
#
# Comprehensiveness (the drop in the predicted probability when the top 1-50 % of codes are
# removed: higher is better) and sufficiency (the drop when only they are kept: lower is
# better), over the patients predicted positive (PyHealth's default filter). Our interpreters
# go in unchanged.

# %%
evaluator = Evaluator(model, percentages=[10, 20, 50])
loader = get_dataloader(test, batch_size=len(test))
scores = {}
for name, interpreter in interpreters.items():
    scores[name] = evaluator.evaluate_attribution(loader, interpreter)
table = ["| method | comprehensiveness ↑ | sufficiency ↓ | pointing ↑ |", "|---|---:|---:|---:|"]
for name, score in scores.items():
    table.append(
        f"| {name} | {score['comprehensiveness']:.3f} | {score['sufficiency']:.3f} "
        f"| {pointing(maps[name], batch):.2f} |"
    )
print("\n".join(table))
wrote(OUT / "pyhealth_scores.md").write_text("\n".join(table) + "\n")

# %% [markdown]
# ## 6. One patient's codes, coloured by relevance
#
# Each row is one interpreter; each cell one code (conditions first, then the procedures of
# each visit); the colour is the relevance divided by that row's largest magnitude. The signal
# code is framed.


# %%
def codes_of(i):
    conditions = dataset.input_processors["conditions"].code_vocab
    procedures = dataset.input_processors["procedures"].code_vocab
    names = {**{v: k for k, v in conditions.items()}}
    cells = [("conditions", (i, t), names[int(c)]) for t, c in enumerate(batch["conditions"][i])]
    names = {v: k for k, v in procedures.items()}
    for v, visit in enumerate(batch["procedures"][i]):
        cells += [("procedures", (i, v, c), f"v{v}:{names[int(code)]}") for c, code in
                  enumerate(visit) if int(code) != 0]  # fmt: skip
    return [cell for cell in cells if cell[2] not in ("<pad>", "<unk>")]


def show_patient(i, path):
    cells = codes_of(i)
    figure, axis = plt.subplots(figsize=(0.9 * len(cells) + 3, 0.5 * len(maps) + 0.6))
    grid = torch.zeros(len(maps), len(cells))
    for row, relevance in enumerate(maps.values()):
        values = torch.stack([relevance[key][index] for key, index, _ in cells]).detach()
        grid[row] = values / values.abs().max().clamp_min(1e-12)
    axis.imshow(grid.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    axis.set_xticks(range(len(cells)), [label for *_, label in cells], rotation=60, fontsize=8)
    axis.set_yticks(range(len(maps)), list(maps), fontsize=8)
    for column, (_, _, label) in enumerate(cells):
        if label.endswith((SIGNAL_CONDITION, SIGNAL_PROCEDURE)):
            axis.add_patch(plt.Rectangle((column - 0.5, -0.5), 1, len(maps), fill=False, lw=2))
    axis.set_title(f"patient {batch['patient_id'][i]} (label 1): relevance / row maximum")
    figure.savefig(wrote(path), dpi=110, bbox_inches="tight")
    finish(figure)


positives = torch.where(batch["label"][:, 0] == 1)[0].tolist()
with_visits = [i for i in positives if (batch["procedures"][i].sum(-1) != 0).sum() >= 2]
show_patient((with_visits or positives)[0], OUT / "pyhealth_patient.png")

# %% [markdown]
# ## What to take from it
#
# - Our `CheferRelevance` is PyHealth's on this model, to float precision, through the same
#   call; it also explains `TorchvisionModel`'s ViT, which PyHealth's refuses, and refuses
#   `StageAttentionNet` (token mixing outside attention), naming `AttnLRP`.
# - Chefer's and rollout's maps are per token, here per visit: the signal procedure ties with
#   the other codes of its visit, and the raw row gives the read position (the first
#   condition, the first visit) the identity's 1. Per-code methods (AttnLRP, Integrated
#   Gradients) can single the signal code out; compare them on your own model with the
#   `Evaluator`, as above.
# - `docs/PYHEALTH.md` lists every PyHealth model and feature type with PyHealth's map, ours
#   and a float64 reference.
