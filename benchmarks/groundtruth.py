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
- Both: RISE deletion/insertion (probability).

Each task is one dataset job (:func:`captum_chefer.jobs.run_job`): the methods, the metrics
and the stored per-example results are those of ``captum-chefer-job``; ``--jobs DIR`` keeps the
job folders (rerunning then resumes them). Everything is seeded; a rerun gives the same table
except the timings. Writes ``groundtruth.{md,json,png}`` and the mean curves
``groundtruth_{vision,text}_curves.png`` (``groundtruth_quick*`` with ``--quick``) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.synthetic import (  # noqa: E402
    COLOURS,
    ImageSet,
    MeanPoolClassifier,
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
from captum_chefer.core import CheferMatrixReader  # noqa: E402
from captum_chefer.jobs import JobResults, JobSettings, Method, TensorSource, run_job  # noqa: E402

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


def methods(settings: Settings, integrated_gradients: str, *extra: str) -> list[Method]:
    """Our attention methods, Integrated Gradients and ``extra`` Captum methods, named."""
    ig = {"n_steps": settings.ig_steps, "internal_batch_size": 256}
    chosen = [Method(cls, name=name) for name, cls in ATTENTION_METHODS.items()]
    chosen.append(Method("IntegratedGradients", ig, name=integrated_gradients))
    return chosen + [Method(name) for name in extra]


def job(model, source: TensorSource, chosen: list[Method], folder: Path, settings: Settings,
        **defaults) -> tuple[dict, JobResults]:  # fmt: skip
    """Run (or resume) one dataset job; its merged scores and its stored results."""
    job_settings = JobSettings(
        batches_per_shard=2, seed=settings.seed, threads=None, method_defaults=defaults
    )
    summary = run_job(model, source, chosen, folder, settings=job_settings, model_name=folder.name)
    assert summary.report is not None, "the job did not finish"
    return summary.report, JobResults(folder)


# --------------------------------------------------------------------------------- vision


def run_vision(settings: Settings, jobs: Path) -> tuple[dict, dict]:
    log("[vision] data and training")
    train, test = make_images(settings.train_images, 1), make_images(settings.test_images, 2)
    model = train_vit(small_vit(seed=settings.seed), train, settings.train_steps, settings.seed)
    held_out = accuracy(model, test.images, labels=test.labels)
    log(f"[vision] held-out accuracy {held_out:.3f} on {len(test.labels)} images")
    with torch.no_grad():
        predicted = model(test.images).argmax(1)
    source = TensorSource(test.images, settings.batch, labels=test.labels, evidence=test.masks)
    chosen = methods(
        settings, "Integrated Gradients", "Saliency", "InputXGradient", "AttnLRP", "CPLRP"
    )
    results, stored = job(model, source, chosen, jobs / "vision", settings)
    for name, scores in results.items():
        log(f"[vision] {name:22s} " + _short(scores))
    pointing = stored.table("score")
    info = {
        "held_out_accuracy": held_out,
        "test_images": len(test.labels),
        "pointing_per_class": {
            name: pointing_per_class(pointing[name]["pointing"], test) for name in results
        },
        "cls_row_mass_per_layer": cls_row_mass(model, test.images[:64], predicted[:64]),
    }
    return {"info": info, "methods": results}, {"data": test, "results": stored}


def pointing_per_class(hits: Tensor, data: ImageSet) -> dict[str, float]:
    """The pointing game's hit rate per true class (object colour)."""
    return {
        colour: hits[data.labels == index].mean().item()
        for index, colour in enumerate(COLOURS)
        if (data.labels == index).any()
    }


def cls_row_mass(model: torch.nn.Module, images: Tensor, target: Tensor) -> list[float]:
    """Per layer, the mean of ``Σ_j Abar_l[CLS, j]``: how much each layer can add to R = I + …"""
    consumer = CheferMatrixReader()
    trace_attention(model, model, (images,), target, None, consumer)
    return [consumer.abars[index][:, 0].sum(-1).mean().item() for index in sorted(consumer.abars)]


# ----------------------------------------------------------------------------------- text


def run_text(settings: Settings, jobs: Path) -> tuple[dict, dict]:
    log("[text] MiniLM, data and head training")
    encoder, tokenizer = load_minilm()
    train = make_sentences(settings.train_sentences, 1, tokenizer)
    test = make_sentences(settings.test_sentences, 2, tokenizer)
    classifier = train_text_head(MeanPoolClassifier(encoder), train, seed=settings.seed)
    held_out = accuracy(classifier, test.ids, test.mask, labels=test.labels)
    log(f"[text] held-out accuracy {held_out:.3f} on {len(test.labels)} sentences")
    source = TensorSource(
        test.ids,
        settings.batch,
        attention_mask=test.mask,
        special=test.special,
        labels=test.labels,
        evidence=test.evidence,
        baseline=tokenizer.mask_token_id,
    )
    chosen = methods(settings, "Layer Integrated Gradients", "AttnLRP", "CPLRP")
    results, _ = job(classifier, source, chosen, jobs / "text", settings, token_index="mean")
    for name, scores in results.items():
        log(f"[text] {name:26s} " + _short(scores))
    info = {"held_out_accuracy": held_out, "test_sentences": len(test.labels)}
    return {"info": info, "methods": results}, {}


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
    ("deletion_auc", "deletion ↓", 100),
    ("insertion_auc", "insertion ↑", 100),
    ("ms_per_example", "ms / example", 1),
]
TEXT_COLUMNS = [
    ("token_f1", "token F1 ↑", 100),
    ("positive_auc", "pos. AUC ↓", 1),
    ("negative_auc", "neg. AUC ↑", 1),
    ("deletion_auc", "deletion ↓", 100),
    ("insertion_auc", "insertion ↑", 100),
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
(pos.) or least relevant first (neg.); deletion/insertion (RISE): area under the probability \
as pixels are removed / inserted, x 100. Gradient methods are summed over colour channels.

{markdown_table(vision["methods"], VISION_COLUMNS)}

![vision curves]({path.stem}_vision_curves.png)

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

![text curves]({path.stem}_text_curves.png)

Each task ran as one dataset job (`captum_chefer.jobs.run_job`, per-example results in \
safetensors shards); both are seeded, so the scores are reproducible.
"""
    path.write_text(body)


def write_figure(results: dict, vision: dict, text: dict, path: Path, examples: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stored: JobResults = vision["results"]
    names = stored.methods
    examples = min(examples, len(vision["data"].labels))
    figure = plt.figure(figsize=(2 * (len(names) + 1), 2 * examples + 3.2), layout="constrained")
    top, bottom = figure.subfigures(2, 1, height_ratios=[2 * examples, 3.2])
    axes = top.subplots(examples, len(names) + 1, squeeze=False)
    for row in range(examples):
        image, mask = vision["data"].images[row], vision["data"].masks[row]
        axes[row, 0].imshow(image.permute(1, 2, 0).numpy())
        for column, name in enumerate(names, start=1):
            heat = stored[row].attributions[name][0]
            axes[row, column].imshow(heat.numpy(), cmap="magma")
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
    parser.add_argument(
        "--jobs", type=Path, default=None, help="keep the two dataset jobs here (rerun resumes)"
    )
    args = parser.parse_args(argv)
    if args.jobs is None:
        with tempfile.TemporaryDirectory() as scratch:
            return run_all(args, Path(scratch))
    return run_all(args, args.jobs)


def run_all(args: argparse.Namespace, jobs: Path) -> dict:
    """Both tasks as dataset jobs under ``jobs``; the table, JSON and figures into ``--out``."""
    settings = QUICK if args.quick else Settings()
    warnings.filterwarnings("ignore", message="Input Tensor .* did not already require gradients")
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    vision_results, vision = run_vision(settings, jobs)
    text_results, text = run_text(settings, jobs)
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
    for task in ("vision", "text"):
        curves = (jobs / task / "report.png").read_bytes()
        stem.with_name(f"{stem.name}_{task}_curves.png").write_bytes(curves)
    log(f"wrote {stem}.md, .json and .png in {results['runtime_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
