"""Ground-truth benchmark: Chefer's rule, the attention baselines and Captum's gradient methods
on synthetic tasks whose evidence is known (see ``synthetic.py``).

```bash
.venv/bin/python benchmarks/groundtruth.py            # full CPU run, a few minutes
.venv/bin/python benchmarks/groundtruth.py --quick    # smoke run, seconds
```

- **Vision:** a small ViT trained from scratch; pointing game and Chefer et al.'s segmentation
  test (pixel accuracy, mIoU, AP) against the object's mask, and the positive/negative
  perturbation AUC (pixels set to 0, top-1 accuracy on the predicted class, CVPR 2021 Sec. 4).
- **Text:** frozen pretrained MiniLM + trained linear head; token F1 against the keyword tokens
  (top-k real tokens with k = number of keyword tokens, [CLS]/[SEP]/padding excluded), the
  perturbation AUCs ([MASK] in place of tokens) and ERASER comprehensiveness/sufficiency.

Everything is seeded; a rerun gives the same table except the timings. Writes
``groundtruth.{md,json,png}`` (``groundtruth_quick.*`` with ``--quick``) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.synthetic import (  # noqa: E402
    COLOURS,
    ImageSet,
    MeanPoolClassifier,
    SentenceSet,
    accuracy,
    load_minilm,
    make_images,
    make_sentences,
    small_vit,
    train_text_head,
    train_vit,
)
from captum_chefer import (  # noqa: E402
    AttentionGradCAM,
    AttentionRollout,
    CheferRelevance,
    GradientRollout,
    RawAttention,
)
from captum_chefer.attr.trace import trace_attention  # noqa: E402
from captum_chefer.core import MatrixRelevance  # noqa: E402
from captum_chefer.metrics import (  # noqa: E402
    comprehensiveness,
    perturbation_auc,
    perturbation_curve,
    pointing_game,
    segmentation_scores,
    sufficiency,
    token_f1,
)

Method = Callable[..., Tensor]
ATTENTION_METHODS = {
    "Chefer (ICCV'21)": CheferRelevance,
    "Raw attention": RawAttention,
    "Rollout": AttentionRollout,
    "Attention Grad-CAM": AttentionGradCAM,
    "Gradient rollout": GradientRollout,
}


@dataclass(frozen=True)
class Settings:
    """Sizes of one run."""

    train_images: int = 4000
    train_steps: int = 300
    test_images: int = 256
    train_sentences: int = 600
    test_sentences: int = 120
    ig_steps: int = 32
    batch: int = 64
    seed: int = 0


QUICK = Settings(256, 10, 8, 64, 6, 4, 8)


def log(message: str) -> None:
    print(message, flush=True)


def timed(method: Method, batch: int, *tensors: Tensor) -> tuple[Tensor, float]:
    """``method`` applied in batches; the map and the seconds per example (after a warm-up)."""
    method(*(t[:2] for t in tensors))
    start = time.perf_counter()
    n = len(tensors[0])
    maps = torch.cat(
        [method(*(t[i : i + batch] for t in tensors)).detach() for i in range(0, n, batch)]
    )
    return maps, (time.perf_counter() - start) / n


# --------------------------------------------------------------------------------- vision


def vision_methods(model: torch.nn.Module, settings: Settings) -> dict[str, Method]:
    """Each method maps ``(images, target)`` to a ``(B, 1, H, W)`` map."""
    from captum.attr import InputXGradient, IntegratedGradients, Saliency

    def attention(cls) -> Method:
        return lambda x, t: cls(model).attribute(x, target=t)[:, :1]

    def pixels(attribution, **options) -> Method:
        return lambda x, t: attribution.attribute(x, target=t, **options).sum(1, keepdim=True)

    methods = {name: attention(cls) for name, cls in ATTENTION_METHODS.items()}
    ig_options = {"n_steps": settings.ig_steps, "internal_batch_size": 256}
    methods["Integrated Gradients"] = pixels(IntegratedGradients(model), **ig_options)
    methods["Saliency"] = pixels(Saliency(model))
    methods["InputXGradient"] = pixels(InputXGradient(model))
    return methods


def vision_scores(model, data: ImageSet, maps: Tensor, predicted: Tensor) -> dict[str, float]:
    seg = segmentation_scores(maps[:, 0], data.masks)
    curves = {
        first: perturbation_curve(
            model,
            data.images,
            maps,
            target=predicted,
            most_relevant_first=first,
            score="correct",
            max_examples_per_batch=1024,
        )
        for first in (True, False)
    }
    return {
        "pointing": pointing_game(maps[:, 0], data.masks).mean.item(),
        "pixel_accuracy": seg.mean_pixel_accuracy.item(),
        "miou": seg.mean_iou.item(),
        "ap": seg.mean_average_precision.item(),
        "positive_auc": perturbation_auc(curves[True], reduction="mean").item(),
        "negative_auc": perturbation_auc(curves[False], reduction="mean").item(),
    }


def run_vision(settings: Settings) -> tuple[dict, dict]:
    log("[vision] data and training")
    train, test = make_images(settings.train_images, 1), make_images(settings.test_images, 2)
    model = train_vit(small_vit(seed=settings.seed), train, settings.train_steps, settings.seed)
    held_out = accuracy(model, test.images, labels=test.labels)
    log(f"[vision] held-out accuracy {held_out:.3f} on {len(test.labels)} images")
    with torch.no_grad():
        predicted = model(test.images).argmax(1)
    results, maps, per_class = {}, {}, {}
    for name, method in vision_methods(model, settings).items():
        maps[name], seconds = timed(method, settings.batch, test.images, predicted)
        results[name] = vision_scores(model, test, maps[name], predicted)
        results[name]["ms_per_example"] = 1000 * seconds
        per_class[name] = pointing_per_class(maps[name], test)
        log(f"[vision] {name:22s} " + _short(results[name]))
    info = {
        "held_out_accuracy": held_out,
        "test_images": len(test.labels),
        "pointing_per_class": per_class,
        "cls_row_mass_per_layer": cls_row_mass(model, test.images[:64], predicted[:64]),
    }
    return {"info": info, "methods": results}, {"data": test, "maps": maps}


def pointing_per_class(maps: Tensor, data: ImageSet) -> dict[str, float]:
    """The pointing game's hit rate per true class (object colour)."""
    hits = pointing_game(maps[:, 0], data.masks).per_example
    return {
        colour: hits[data.labels == index].mean().item()
        for index, colour in enumerate(COLOURS)
        if (data.labels == index).any()
    }


def cls_row_mass(model: torch.nn.Module, images: Tensor, target: Tensor) -> list[float]:
    """Per layer, the mean of ``Σ_j Abar_l[CLS, j]``: how much each layer can add to R = I + …"""
    consumer = MatrixRelevance()
    trace_attention(model, model, (images,), target, None, consumer)
    return [consumer.abars[index][:, 0].sum(-1).mean().item() for index in sorted(consumer.abars)]


# ----------------------------------------------------------------------------------- text


def text_methods(classifier: MeanPoolClassifier, settings: Settings, pad_id: int):
    """Each method maps ``(ids, mask, special, target)`` to a ``(B, T)`` token relevance."""
    from captum.attr import LayerIntegratedGradients

    def attention(cls) -> Method:
        keep = {} if cls is CheferRelevance else {"self_relevance": "keep"}
        return lambda ids, mask, special, t: cls(classifier).attribute(
            ids, t, (mask,), token_index="mean", output="token", **keep
        )

    lig = LayerIntegratedGradients(classifier, classifier.encoder.embeddings)

    def integrated_gradients(ids, mask, special, t):
        reference = torch.where(special | (mask == 0), ids, torch.full_like(ids, pad_id))
        attributions = lig.attribute(
            ids,
            reference,
            target=t,
            additional_forward_args=(mask,),
            n_steps=settings.ig_steps,
            internal_batch_size=256,
        )
        return attributions.sum(-1)

    methods = {name: attention(cls) for name, cls in ATTENTION_METHODS.items()}
    methods["Layer Integrated Gradients"] = integrated_gradients
    return methods


def text_scores(classifier, data: SentenceSet, relevance: Tensor, predicted, mask_id: int):
    candidates = data.mask.bool() & ~data.special
    options = {
        "target": predicted,
        "additional_forward_args": (data.mask,),
        "baselines": mask_id,
        "attention_mask": candidates.long(),
        "max_examples_per_batch": 256,
    }
    curves = {
        first: perturbation_curve(
            classifier,
            data.ids,
            relevance,
            most_relevant_first=first,
            score="correct",
            **options,
        )
        for first in (True, False)
    }
    return {
        "token_f1": token_f1(relevance, data.evidence, candidates).mean.item(),
        "positive_auc": perturbation_auc(curves[True], reduction="mean").item(),
        "negative_auc": perturbation_auc(curves[False], reduction="mean").item(),
        "comprehensiveness": comprehensiveness(
            classifier, data.ids, relevance, **options
        ).mean.item(),
        "sufficiency": sufficiency(classifier, data.ids, relevance, **options).mean.item(),
    }


def run_text(settings: Settings) -> tuple[dict, dict]:
    log("[text] MiniLM, data and head training")
    encoder, tokenizer = load_minilm()
    train = make_sentences(settings.train_sentences, 1, tokenizer)
    test = make_sentences(settings.test_sentences, 2, tokenizer)
    classifier = train_text_head(MeanPoolClassifier(encoder), train, seed=settings.seed)
    held_out = accuracy(classifier, test.ids, test.mask, labels=test.labels)
    log(f"[text] held-out accuracy {held_out:.3f} on {len(test.labels)} sentences")
    with torch.no_grad():
        predicted = classifier(test.ids, test.mask).argmax(1)
    results, maps = {}, {}
    methods = text_methods(classifier, settings, tokenizer.pad_token_id)
    for name, method in methods.items():
        maps[name], seconds = timed(
            method, settings.batch, test.ids, test.mask, test.special, predicted
        )
        results[name] = text_scores(
            classifier, test, maps[name], predicted, tokenizer.mask_token_id
        )
        results[name]["ms_per_example"] = 1000 * seconds
        log(f"[text] {name:26s} " + _short(results[name]))
    info = {"held_out_accuracy": held_out, "test_sentences": len(test.labels)}
    tokens = [tokenizer.convert_ids_to_tokens(row) for row in test.ids.tolist()]
    return {"info": info, "methods": results}, {"data": test, "maps": maps, "tokens": tokens}


def _short(scores: dict[str, float]) -> str:
    return "  ".join(f"{key} {value:.3f}" for key, value in scores.items())


# -------------------------------------------------------------------------------- outputs

VISION_COLUMNS = [
    ("pointing", "pointing ↑", 100),
    ("pixel_accuracy", "pixel acc ↑", 100),
    ("miou", "mIoU ↑", 100),
    ("ap", "AP ↑", 100),
    ("positive_auc", "pos. AUC ↓", 1),
    ("negative_auc", "neg. AUC ↑", 1),
    ("ms_per_example", "ms / example", 1),
]
TEXT_COLUMNS = [
    ("token_f1", "token F1 ↑", 100),
    ("positive_auc", "pos. AUC ↓", 1),
    ("negative_auc", "neg. AUC ↑", 1),
    ("comprehensiveness", "compr. ↑", 100),
    ("sufficiency", "suff. ↓", 100),
    ("ms_per_example", "ms / example", 1),
]


def markdown_table(methods: dict[str, dict[str, float]], columns) -> str:
    lines = [
        "| method | " + " | ".join(label for _, label, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, scores in methods.items():
        cells = [f"{scores[key] * scale:.1f}" for key, _, scale in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_class_table(per_class: dict[str, dict[str, float]]) -> str:
    classes = list(next(iter(per_class.values())))
    lines = ["| method | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
    for name, hits in per_class.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * hits[c]:.0f}" for c in classes) + " |")
    return "\n".join(lines)


def write_markdown(results: dict, path: Path) -> None:
    vision, text, settings = results["vision"], results["text"], results["settings"]
    body = f"""# Ground-truth benchmark{" (quick)" if results["quick"] else ""}

Produced by `benchmarks/groundtruth.py{" --quick" if results["quick"] else ""}` in \
{results["runtime_s"]:.0f} s on {results["machine"]}. Seeded: a rerun gives the same scores \
(timings vary). Settings: `{json.dumps(settings)}`.

## Vision: small ViT trained from scratch on coloured objects with a decoy

Held-out accuracy **{100 * vision["info"]["held_out_accuracy"]:.1f} %** on \
{vision["info"]["test_images"]} images. Maps explain the predicted class. Pointing game and \
segmentation against the object mask (%, segmentation as in Chefer et al. CVPR 2021); \
perturbation AUC: top-1 accuracy while 0-90 % of the pixels are set to 0, most relevant first \
(pos.) or least relevant first (neg.). Gradient methods are summed over colour channels.

{markdown_table(vision["methods"], VISION_COLUMNS)}

Pointing game per class (%):

{per_class_table(vision["info"]["pointing_per_class"])}

Mean `Σ_j Abar_l[CLS, j]` per layer (first to last), i.e. what each layer can add to the \
identity's 1 in Chefer's `R = I + …`: \
{", ".join(f"{value:.2g}" for value in vision["info"]["cls_row_mass_per_layer"])}.

## Text: frozen all-MiniLM-L6-v2 + linear head on keyword sentences

Held-out accuracy **{100 * text["info"]["held_out_accuracy"]:.1f} %** on \
{text["info"]["test_sentences"]} sentences. Relevance read with `token_index="mean"` (the \
model mean-pools); attention baselines with `self_relevance="keep"`. Token F1: the top-k real \
tokens (k = number of keyword tokens; [CLS]/[SEP]/padding excluded) against the keywords (%). \
Perturbation AUC and ERASER comprehensiveness/sufficiency (%) replace tokens by [MASK] and \
never touch [CLS]/[SEP]/padding.

{markdown_table(text["methods"], TEXT_COLUMNS)}
"""
    path.write_text(body)


def write_figure(results: dict, vision: dict, text: dict, path: Path, examples: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(vision["maps"])
    examples = min(examples, len(vision["data"].labels))
    figure = plt.figure(figsize=(2 * (len(names) + 1), 2 * examples + 3.2), layout="constrained")
    top, bottom = figure.subfigures(2, 1, height_ratios=[2 * examples, 3.2])
    axes = top.subplots(examples, len(names) + 1, squeeze=False)
    for row in range(examples):
        image, mask = vision["data"].images[row], vision["data"].masks[row]
        axes[row, 0].imshow(image.permute(1, 2, 0).numpy())
        for column, name in enumerate(names, start=1):
            axes[row, column].imshow(vision["maps"][name][row, 0].numpy(), cmap="magma")
        for axis in axes[row]:
            axis.contour(mask.float().numpy(), levels=[0.5], colors="cyan", linewidths=0.8)
            axis.set_xticks([])
            axis.set_yticks([])
    for column, name in enumerate(["image"] + names):
        axes[0, column].set_title(name, fontsize=8)
    bars = bottom.subplots(1, 3)
    _bars(bars[0], results["vision"]["methods"], "miou", "vision mIoU (%)")
    _bars(bars[1], results["vision"]["methods"], "pointing", "vision pointing game (%)")
    _bars(bars[2], results["text"]["methods"], "token_f1", "text token F1 (%)")
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _bars(axis, methods: dict[str, dict[str, float]], key: str, title: str) -> None:
    names = list(methods)
    axis.barh(names, [100 * methods[name][key] for name in names], color="tab:blue")
    axis.invert_yaxis()
    axis.set_title(title, fontsize=9)
    axis.tick_params(labelsize=7)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    warnings.filterwarnings("ignore", message="Input Tensor .* did not already require gradients")
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    vision_results, vision = run_vision(settings)
    text_results, text = run_text(settings)
    results = {
        "quick": args.quick,
        "settings": asdict(settings),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}",
        "vision": vision_results,
        "text": text_results,
        "runtime_s": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("groundtruth_quick" if args.quick else "groundtruth")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    write_markdown(results, stem.with_suffix(".md"))
    write_figure(results, vision, text, stem.with_suffix(".png"))
    log(f"wrote {stem}.md, .json and .png in {results['runtime_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
