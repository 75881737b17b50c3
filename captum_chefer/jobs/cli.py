"""``captum-chefer-job``: compare attribution methods over a dataset, resumable, on torchrun.

```bash
captum-chefer-job --model minilm --data sentences.jsonl --methods CheferRelevance \\
    AttentionRollout IntegratedGradients:n_steps=16 --out runs/minilm
torchrun --nproc_per_node=2 -m captum_chefer.jobs --model minilm --data sentences.jsonl ...
```

Everything is checked before anything is written, so a mistake leaves the folder as it was and
the corrected command runs in it. Rerun the same command to resume: finished shards are kept,
damaged ones redone. The report is ``<out>/report.md`` with ``report.png`` beside it.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .distributed import local_device
from .methods import Method, check_labels, check_names
from .models import READY, build_model
from .progress import LOG
from .runner import JobSettings, JobSummary, run_job

EXAMPLE = """\
example (rerun the same command to resume; a mistake leaves --out as it was):
  captum-chefer-job --model minilm --data sentences.jsonl --out runs/minilm \\
      --methods CheferRelevance AttentionRollout IntegratedGradients:n_steps=16"""


def parse_method(text: str) -> Method:
    """``Name`` or ``Name:key=value,key=value`` (values are Python literals, else strings).

    Example:
        >>> method = parse_method("IntegratedGradients:n_steps=16,method=gausslegendre")
        >>> method.attribution, method.options
        ('IntegratedGradients', {'n_steps': 16, 'method': 'gausslegendre'})
    """
    name, _, rest = text.partition(":")
    if not name:
        raise ValueError(f"--methods {text!r}: give a method name before the options.")
    options = {}
    for item in filter(None, re.split(r",(?=\w+=)", rest)):  # commas before the next key=
        key, equals, value = item.partition("=")
        if not equals or not key.isidentifier():
            raise ValueError(f"Method option {item!r} in {text!r} must read key=value.")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return Method(name, options)


def _count(minimum: int):
    """An argparse type: an int of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}")
        return value

    parse.__name__ = "count"
    return parse


def parser() -> argparse.ArgumentParser:
    """The command line's arguments; every option's help names its default.

    Example:
        >>> text = parser().format_help()
        >>> text.rstrip().splitlines()[-1].strip()
        '--methods CheferRelevance AttentionRollout IntegratedGradients:n_steps=16'
    """
    cli = argparse.ArgumentParser(
        prog="captum-chefer-job",
        description="Compare attribution methods over a dataset: explain, score and report;\n"
        "resumable; on one process or on torchrun's ranks.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = cli.add_argument
    ready = ", ".join(READY)
    add(
        "--model",
        required=True,
        metavar="NAME",
        help=f"{ready} (the shipped all-MiniLM-L6-v2 "
        "as a zero-shot sentiment classifier), or module:function building yours (required)",
    )
    add(
        "--data",
        required=True,
        metavar="PATH",
        help=".jsonl/.csv of texts (a text column, "
        "optionally label), a saved Hugging Face dataset, or a folder of images (masks in "
        "masks/) (required)",
    )
    add(
        "--methods",
        nargs="+",
        required=True,
        metavar="METHOD",
        help="Name or "
        "Name:key=value,...: ours (CheferRelevance, AttentionRollout, ...) and Captum's "
        "(IntegratedGradients, ...) (required)",
    )
    add(
        "--out",
        required=True,
        metavar="FOLDER",
        help="output folder; rerun the same command to resume (required)",
    )
    add(
        "--overwrite",
        action="store_true",
        help="delete the job files (index, shards, "
        "report) --out holds and start over (default: off: a folder holding another job is "
        "refused)",
    )
    add(
        "--batch-size",
        metavar="N",
        type=_count(1),
        default=16,
        help="examples per batch (default: 16)",
    )
    add(
        "--batches-per-shard",
        metavar="N",
        type=_count(1),
        default=4,
        help="batches per shard, the unit saved, resumed and shared between ranks (default: 4)",
    )
    add(
        "--image-size",
        metavar="PIXELS",
        type=_count(1),
        default=224,
        help="side image files are resized to (default: 224)",
    )
    add(
        "--text-column",
        metavar="COLUMN",
        default=None,
        help="the column holding the texts (default: the first of text, sentence, content)",
    )
    add(
        "--label-column",
        metavar="COLUMN",
        default="label",
        help="the column holding class "
        "labels, for the accuracy and --target label (default: label)",
    )
    add(
        "--label-names",
        nargs="+",
        default=None,
        metavar="NAME",
        help="class names in "
        "class-id order, to read labels written as names (default: the model's own: negative "
        "positive for minilm)",
    )
    add(
        "--target",
        choices=("predicted", "label"),
        default="predicted",
        help="the class to "
        "explain: the model's prediction or the data's label (default: predicted)",
    )
    add(
        "--seed",
        metavar="N",
        type=_count(0),
        default=0,
        help="seeds every (batch, method) computation (default: 0)",
    )
    add(
        "--threads",
        metavar="N",
        type=_count(1),
        default=1,
        help="torch threads per rank; reruns are bit-identical at the same count (default: 1)",
    )
    add(
        "--limit",
        metavar="N",
        type=_count(1),
        default=None,
        help="only the first N examples of a text dataset (default: all)",
    )
    add(
        "--device",
        default="auto",
        help="auto (cuda:LOCAL_RANK when CUDA is available, else "
        "cpu), cpu, or a device such as cuda:1 (default: auto)",
    )
    add(
        "--log-every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds between progress lines when stderr is not a terminal (default: 30)",
    )
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job the arguments describe; prints the report on rank 0."""
    args = parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _log_to_stderr():
        try:
            summary = _job(args)
        except (ValueError, TypeError, OSError, ImportError, KeyError) as error:
            print(f"captum-chefer-job: error: {error}", file=sys.stderr)
            return 2
    if summary.report is not None:
        print((summary.folder / "report.md").read_text())
    return 0


def _job(args: argparse.Namespace) -> JobSummary:
    """Check the cheap things first (method names, settings), then build and run."""
    from .data import open_source
    from .identity import class_names

    methods = [parse_method(text) for text in args.methods]
    check_labels(methods)
    check_names(methods)
    settings = JobSettings(
        batches_per_shard=args.batches_per_shard,
        seed=args.seed,
        threads=args.threads,
        target=args.target,
    )
    settings.check()
    device = _device(args.device)
    built = build_model(args.model)
    built.model.to(device)
    names = class_names(built.model, args.label_names or built.class_names)
    source = open_source(
        args.data,
        tokenizer=built.tokenizer,
        batch_size=args.batch_size,
        image_size=args.image_size,
        text_column=args.text_column,
        label_column=args.label_column,
        label_names=names,
    )
    if args.limit is not None:
        source = _limited(source, args.limit)
    return run_job(
        built,
        source,
        methods,
        args.out,
        settings=settings,
        label_names=names,
        overwrite=args.overwrite,
        log_every=args.log_every,
    )


def _device(text: str) -> torch.device:
    if text == "auto":
        return local_device()
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise ValueError(
            f"--device {text!r} is not a device; use auto, cpu, cuda or cuda:N."
        ) from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available here; use --device cpu.")
    return device


@contextmanager
def _log_to_stderr() -> Iterator[None]:
    """Show the job's messages on stderr while the command runs (and only then)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("captum-chefer-job: %(message)s"))
    level = LOG.level
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    try:
        yield
    finally:
        LOG.removeHandler(handler)
        LOG.setLevel(level)


def _limited(source: Any, limit: int) -> Any:
    from .data import TextSource

    if not isinstance(source, TextSource):
        raise ValueError("--limit applies to text datasets only; leave it out for images.")
    labels = None if source.labels is None else source.labels[:limit]
    return TextSource(
        source.texts[:limit],
        source.tokenizer,
        source.batch_size,
        labels=labels,
        max_length=source.max_length,
    )
