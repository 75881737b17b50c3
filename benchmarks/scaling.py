"""Scaling benchmark of dataset jobs: throughput on 1 and 2 ranks (gloo, 1 thread each).

```bash
.venv/bin/python benchmarks/scaling.py                 # 64 MiniLM sentences, 3 repeats
.venv/bin/python benchmarks/scaling.py --examples 16 --repeats 1 --out /tmp/scaling  # smoke
```

Each run is ``torchrun --nproc_per_node=N -m captum_chefer.jobs`` on the shipped MiniLM
(zero-shot sentiment, ``--model minilm``) over keyword sentences, in a fresh folder. Throughput
is examples over the compute span (first shard started to last shard finished, read from the
shard records), which leaves out the process start and model load; the end-to-end wall time is
reported too. Runs alternate 1 rank, 2 ranks, ... and the medians are taken; the spread
(max - min over median) states the noise. Every run's tensors must equal the first 1-rank
run's, bit for bit. Writes ``scaling.{md,json}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.synthetic import make_sentences  # noqa: E402
from captum_chefer.pretrained import load_minilm  # noqa: E402

METHODS = ["CheferRelevance", "AttentionRollout"]


def write_sentences(path: Path, examples: int) -> None:
    """``examples`` keyword sentences (seed 11) as JSONL."""
    tokenizer = load_minilm()[1]
    data = make_sentences(examples, 11, tokenizer)
    rows = [{"text": t, "label": y} for t, y in zip(data.sentences, data.labels.tolist())]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def run(ranks: int, data: Path, out: Path, batch_size: int) -> dict:
    """One job on ``ranks`` processes; its wall time, compute span and throughput."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
        "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "captum_chefer.jobs",
        "--model", "minilm", "--data", str(data), "--out", str(out), "--threads", "1",
        "--batch-size", str(batch_size), "--batches-per-shard", "1", "--methods", *METHODS,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    records = [json.loads(p.read_text()) for p in out.glob("shard-*.json")]
    span = max(r["finished"] for r in records) - min(r["started"] for r in records)
    examples = sum(r["examples"][1] - r["examples"][0] for r in records)
    return {"ranks": ranks, "wall_s": wall, "compute_s": span, "examples_per_s": examples / span}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    merged: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("shard-*.safetensors")):
        merged |= load_file(path)
    return merged


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def summarize(runs: list[dict]) -> dict:
    out = {}
    for ranks in (1, 2):
        rates = [r["examples_per_s"] for r in runs if r["ranks"] == ranks]
        walls = [r["wall_s"] for r in runs if r["ranks"] == ranks]
        median = statistics.median(rates)
        out[ranks] = {
            "median_examples_per_s": median,
            "spread": (max(rates) - min(rates)) / median,
            "median_wall_s": statistics.median(walls),
            "rates": rates,
        }
    out["ratio"] = out[2]["median_examples_per_s"] / out[1]["median_examples_per_s"]
    pairs = [two / one for one, two in zip(out[1]["rates"], out[2]["rates"])]
    out["paired_ratios"] = pairs
    out["median_paired_ratio"] = statistics.median(pairs)
    return out


def markdown(summary: dict, settings: dict, machine: str, equal: bool) -> str:
    rows = [
        f"| {ranks} | {s['median_examples_per_s']:.2f} | {100 * s['spread']:.0f} % | "
        f"{s['median_wall_s']:.0f} | {', '.join(f'{r:.2f}' for r in s['rates'])} |"
        for ranks, s in ((1, summary[1]), (2, summary[2]))
    ]
    return f"""# Scaling of dataset jobs: 1 and 2 ranks

Produced by `benchmarks/scaling.py` on {machine}. Job: `--model minilm` (the shipped
all-MiniLM-L6-v2, zero-shot sentiment), {settings["examples"]} keyword sentences, methods
{", ".join(METHODS)} with every metric, batch {settings["batch_size"]}, 1 batch per shard,
gloo, 1 thread per rank; {settings["repeats"]} runs each, alternating.

| ranks | median examples / s | spread (max-min)/median | median wall s (with start-up) \
| runs (examples / s) |
|---:|---:|---:|---:|---|
{chr(10).join(rows)}

**2 ranks / 1 rank throughput: {summary["ratio"]:.2f}x** (ratio of the medians); run by run
(each 2-rank run over the 1-rank run just before it):
{", ".join(f"{r:.2f}x" for r in summary["paired_ratios"])}, median
{summary["median_paired_ratio"]:.2f}x. Results of every run equal the first 1-rank run bit for
bit: **{"yes" if equal else "NO"}**.

The machine was shared with other jobs while this ran (load average at the start
{settings["load_start"]:.1f}, at the end {settings["load_end"]:.1f} on {os.cpu_count()} cores), so
the ranks competed for cores with other work; the spread column is that noise.
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    settings = {"examples": args.examples, "batch_size": args.batch_size, "repeats": args.repeats,
                "load_start": os.getloadavg()[0]}  # fmt: skip
    runs, reference, equal = [], None, True
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "sentences.jsonl"
        write_sentences(data, args.examples)
        for repeat in range(args.repeats):
            for ranks in (1, 2):
                folder = Path(scratch) / f"run-{repeat}-{ranks}"
                runs.append(run(ranks, data, folder, args.batch_size))
                print(json.dumps(runs[-1]), flush=True)
                results = tensors(folder)
                reference = results if reference is None else reference
                equal &= identical(results, reference)
    settings["load_end"] = os.getloadavg()[0]
    summary = summarize(runs)
    machine = f"{os.cpu_count()} CPU cores, torch {torch.__version__}"
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"settings": settings, "machine": machine, "runs": runs, "summary": summary,
              "bit_identical": equal}  # fmt: skip
    (args.out / "scaling.json").write_text(json.dumps(report, indent=2))
    (args.out / "scaling.md").write_text(markdown(summary, settings, machine, equal))
    print((args.out / "scaling.md").read_text())
    return report


if __name__ == "__main__":
    main()
