"""AttnLRP and CP-LRP against Chefer's rule and (Layer) Integrated Gradients on the
package's ground-truth tasks.

```bash
.venv/bin/python benchmarks/lrp_groundtruth.py            # ~15 min on a busy 2-core CPU
.venv/bin/python benchmarks/lrp_groundtruth.py --quick    # smoke run
```

The tasks, metrics and sizes are those of ``groundtruth.py`` (each method one dataset job,
:func:`captum_chefer.jobs.run_job`, the predicted class explained):

- **Text:** frozen pretrained MiniLM + a trained linear head on sentences with planted
  keywords; token F1 of the top-k real tokens against the keyword tokens, ERASER
  comprehensiveness/sufficiency with ``[MASK]`` in place of removed tokens. Timing: seconds to
  explain every test sentence once (attributions only, one torch thread) and the ratio to
  Chefer's.
- **Vision:** a small ViT trained from scratch on shapes with known masks; pointing game,
  mIoU and the positive/negative perturbation AUCs.

Writes ``lrp_groundtruth{,_quick}.{md,json}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captum_chefer import CPLRP, AttnLRP, CheferRelevance  # noqa: E402
from captum_chefer.datasets.synthetic import (  # noqa: E402
    MeanPoolClassifier,
    accuracy,
    make_images,
    make_sentences,
    small_vit,
    train_text_head,
    train_vit,
)
from captum_chefer.jobs import JobSettings, Method, TensorSource, run_job  # noqa: E402
from captum_chefer.pretrained import load_minilm  # noqa: E402

COLUMNS = [
    ("token_f1", "token F1 ↑"),
    ("comprehensiveness", "compr. ↑"),
    ("sufficiency", "suff. ↓"),
]
VISION_COLUMNS = [
    ("pointing", "pointing ↑", 100),
    ("miou", "mIoU ↑", 100),
    ("positive_auc", "pos. AUC ↓", 1),
    ("negative_auc", "neg. AUC ↑", 1),
]


def methods(ig_steps: int, text: bool = True) -> list[Method]:
    ig = {"n_steps": ig_steps, "internal_batch_size": 256}
    chefer = {"token_index": "mean"} if text else {}
    return [
        Method(CheferRelevance, chefer, name="Chefer (ICCV'21)"),
        Method("IntegratedGradients", ig, name=f"{'Layer ' if text else ''}IG ({ig_steps} steps)"),
        Method(AttnLRP, name="AttnLRP"),
        Method(CPLRP, name="CP-LRP"),
    ]


def timed_job(classifier, source, method: Method, folder: Path) -> tuple[dict, float]:
    """One method's job (the metrics included) and the seconds its attributions took."""
    settings = JobSettings(batches_per_shard=2, seed=0, threads=1)
    start = time.perf_counter()
    summary = run_job(classifier, source, [method], folder, settings=settings, model_name="lrp")
    assert summary.report is not None, "the job did not finish"
    return summary.report[method.label], time.perf_counter() - start


def explain_seconds(classifier, ids, mask, method: Method, batch: int) -> float:
    """Seconds to explain every sentence once (attributions only), one torch thread."""
    instance = method.attribution
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            target = classifier(ids, mask).argmax(1)
        start = time.perf_counter()
        for i in range(0, len(ids), batch):
            chunk = slice(i, i + batch)
            _attribute(classifier, instance, method, ids[chunk], mask[chunk], target[chunk])
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def _attribute(classifier, instance, method: Method, ids, mask, target) -> None:
    if instance == "IntegratedGradients":
        from captum.attr import LayerIntegratedGradients

        layer = classifier.encoder.get_input_embeddings()
        LayerIntegratedGradients(classifier, layer).attribute(
            ids, target=target, additional_forward_args=(mask,), **method.options
        )
    elif instance is CheferRelevance:
        instance(classifier).attribute(ids, target, (mask,), output="token", **method.options)
    else:
        instance(classifier).attribute(ids, target, (mask,))


def markdown(results: dict, info: dict) -> str:
    header = "| method | " + " | ".join(title for _, title in COLUMNS)
    header += " | s (attributions) | × Chefer |\n|---|" + "---|" * (len(COLUMNS) + 2) + "\n"
    chefer = results["Chefer (ICCV'21)"]["seconds"]
    rows = [
        f"| {name} | "
        + " | ".join(f"{100 * scores[key]:.1f}" for key, _ in COLUMNS)
        + f" | {scores['seconds']:.2f} | {scores['seconds'] / chefer:.2f} |"
        for name, scores in results.items()
    ]
    return (
        "# AttnLRP / CP-LRP on the ground-truth text task (pretrained MiniLM)\n\n"
        f"{info['test_sentences']} test sentences, held-out accuracy "
        f"{info['held_out_accuracy']:.3f}; the predicted class is explained. Token F1 and ERASER "
        "comprehensiveness/sufficiency in %, [MASK] replacing tokens. Seconds: attributions "
        "only, all test sentences, one torch thread, batch "
        f"{info['batch']}.\n\n" + header + "\n".join(rows) + "\n"
    )


def run_vision(quick: bool, ig_steps: int, batch: int) -> tuple[dict, dict]:
    """The ground-truth ViT task; scores of each method and the seconds of its whole job."""
    train = make_images(256 if quick else 4000, 1)
    test = make_images(8 if quick else 256, 2)
    model = train_vit(small_vit(seed=0), train, 10 if quick else 300, 0)
    info = {"held_out_accuracy": accuracy(model, test.images, labels=test.labels)}
    source = TensorSource(test.images, batch, labels=test.labels, evidence=test.masks)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for index, method in enumerate(methods(ig_steps, text=False)):
            scores, seconds = timed_job(model, source, method, Path(folder) / str(index))
            results[method.label] = {key: scores[key] for key, _, _ in VISION_COLUMNS}
            results[method.label]["job_seconds"] = seconds
            print("[vision]", method.label, results[method.label], flush=True)
    info["test_images"] = len(test.labels)
    return results, info


def vision_markdown(results: dict, info: dict) -> str:
    header = "| method | " + " | ".join(title for _, title, _ in VISION_COLUMNS)
    header += " | job s |\n|---|" + "---|" * (len(VISION_COLUMNS) + 1) + "\n"
    rows = [
        f"| {name} | "
        + " | ".join(f"{scale * scores[key]:.1f}" for key, _, scale in VISION_COLUMNS)
        + f" | {scores['job_seconds']:.1f} |"
        for name, scores in results.items()
    ]
    return (
        "\n## Vision: small ViT trained on synthetic shapes with known masks\n\n"
        f"{info['test_images']} test images, held-out accuracy {info['held_out_accuracy']:.3f}; "
        "pixel relevance summed over channels. Job seconds include the metrics.\n\n"
        + header
        + "\n".join(rows)
        + "\n"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-vision", action="store_true", help="the text task only")
    args = parser.parse_args(argv)
    train_n, test_n, ig_steps, batch = (64, 8, 4, 8) if args.quick else (600, 120, 32, 64)
    encoder, tokenizer = load_minilm()
    train = make_sentences(train_n, 1, tokenizer)
    test = make_sentences(test_n, 2, tokenizer)
    classifier = train_text_head(MeanPoolClassifier(encoder), train, seed=0, log=lambda _: None)
    info = {
        "held_out_accuracy": accuracy(classifier, test.ids, test.mask, labels=test.labels),
        "test_sentences": test_n,
        "batch": batch,
    }
    source = TensorSource(
        test.ids,
        batch,
        attention_mask=test.mask,
        special=test.special,
        labels=test.labels,
        evidence=test.evidence,
        baseline=tokenizer.mask_token_id,
    )
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for index, method in enumerate(methods(ig_steps)):
            scores, _ = timed_job(classifier, source, method, Path(folder) / str(index))
            scores = {key: scores[key] for key, _ in COLUMNS}
            scores["seconds"] = explain_seconds(classifier, test.ids, test.mask, method, batch)
            results[method.label] = scores
            print(method.label, {k: round(v, 4) for k, v in scores.items()}, flush=True)
    everything = {"info": info, "methods": results}
    text = markdown(results, info)
    if not args.no_vision:
        vision, vision_info = run_vision(args.quick, ig_steps, batch)
        everything["vision"] = {"info": vision_info, "methods": vision}
        text += vision_markdown(vision, vision_info)
    stem = "lrp_groundtruth_quick" if args.quick else "lrp_groundtruth"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(everything, indent=2))
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return everything


if __name__ == "__main__":
    main()
