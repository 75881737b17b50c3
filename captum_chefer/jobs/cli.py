"""``captum-chefer-job``: compare attribution methods over a dataset, resumable, on torchrun.

```bash
captum-chefer-job --model minilm --data sentences.jsonl --methods CheferRelevance \\
    AttentionRollout IntegratedGradients:n_steps=16 --out runs/minilm
torchrun --nproc_per_node=2 -m captum_chefer.jobs --model minilm --data sentences.jsonl ...
```

Rerun the same command to resume: finished shards are kept, the rest redone. The report is
``<out>/report.md`` with ``report.png`` beside it.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from collections.abc import Sequence

import torch

from .distributed import local_device
from .methods import Method
from .models import READY, build_model
from .runner import JobSettings, run_job


def parse_method(text: str) -> Method:
    """``Name`` or ``Name:key=value,key=value`` (values are Python literals, else strings).

    Example:
        >>> method = parse_method("IntegratedGradients:n_steps=16,method=gausslegendre")
        >>> method.attribution, method.options
        ('IntegratedGradients', {'n_steps': 16, 'method': 'gausslegendre'})
    """
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, re.split(r",(?=\w+=)", rest)):  # commas before the next key=
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ValueError(f"Method option {item!r} in {text!r} must read key=value.")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return Method(name, options)


def parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    cli = argparse.ArgumentParser(prog="captum-chefer-job", description=__doc__.split("\n\n")[0])
    cli.add_argument("--model", required=True, help=f"{' or '.join(READY)}, or module:function")
    cli.add_argument(
        "--data", required=True, help=".jsonl/.csv of texts, a saved HF dataset, or an image folder"
    )
    cli.add_argument(
        "--methods", nargs="+", required=True, help="Name or Name:key=value,... (ours and Captum's)"
    )
    cli.add_argument("--out", required=True, help="output folder (rerun to resume)")
    cli.add_argument("--batch-size", type=int, default=16)
    cli.add_argument("--batches-per-shard", type=int, default=4)
    cli.add_argument("--image-size", type=int, default=224)
    cli.add_argument("--text-column", default=None)
    cli.add_argument("--target", choices=("predicted", "label"), default="predicted")
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    cli.add_argument("--limit", type=int, default=None, help="only the first N examples")
    cli.add_argument(
        "--device",
        default="auto",
        help="'auto' (cuda:LOCAL_RANK when CUDA is available, else cpu), 'cpu', or a device",
    )
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job the arguments describe; prints the report on rank 0."""
    args = parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        methods = [parse_method(text) for text in args.methods]
        built = build_model(args.model)
        built.model.to(local_device() if args.device == "auto" else torch.device(args.device))
        from .data import open_source

        source = open_source(
            args.data,
            tokenizer=built.tokenizer,
            batch_size=args.batch_size,
            image_size=args.image_size,
            text_column=args.text_column,
        )
        if args.limit is not None:
            source = _limited(source, args.limit)
        settings = JobSettings(
            batches_per_shard=args.batches_per_shard,
            seed=args.seed,
            threads=args.threads,
            target=args.target,
            method_defaults=built.method_defaults,
        )
        summary = run_job(
            built.model, source, methods, args.out, settings=settings, model_name=built.name
        )
    except (ValueError, TypeError, FileNotFoundError, ImportError, KeyError) as error:
        print(f"captum-chefer-job: error: {error}", file=sys.stderr)
        return 2
    if summary.report is not None:
        print((summary.folder / "report.md").read_text())
    return 0


def _limited(source, limit: int):
    from .data import TextSource

    if not isinstance(source, TextSource):
        raise ValueError("--limit applies to text files only.")
    labels = None if source.labels is None else source.labels[:limit]
    return TextSource(
        source.texts[:limit],
        source.tokenizer,
        source.batch_size,
        labels=labels,
        max_length=source.max_length,
    )
