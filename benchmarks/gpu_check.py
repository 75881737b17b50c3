"""The GPU checks, in one script for one short use of a lent GPU (under 8 minutes).

Stages, in order of importance; each writes its results as soon as it is done, so a run cut
short keeps what it had, and a stage starts only if its share of the time is left:

1. ``syncs``: every run of ``tests/test_host_syncs.py`` (each attribution class on BERT with 2
   and 6 layers, a Llama-style decoder and a timm ViT, the multi-stream classes on BART,
   ``nn.Transformer`` and CLIP, every metric) in float32, and four Llama runs in bfloat16,
   on CUDA: under ``torch.cuda.set_sync_debug_mode("warn")`` every synchronising operation
   with its Python site, the package's told from the model's own (Hugging Face's mask and
   cache code read values too); under ``"error"`` whether the call raised, and where. Beside
   each, the count of the CPU simulation, and the verdict against the test's budget (the
   listed sites, at most 1 per attention call and per metric call, 0 for the LRP rules).
2. ``tests``: the CUDA cases of the test suite (``pytest -k cuda`` on the files that
   parametrise over ``cuda``), the whole output saved as ``DIR/pytest_cuda.txt``.
3. ``split``: a model split across ``cpu`` and ``cuda:0`` (embeddings and the first half of
   the layers on one, the rest on the other, the hidden states moved between them) gives the
   single-device map, for CheferRelevance and AttnLRP.
4. ``checkpointing``: a Llama-style decoder at 16384 tokens: the map with Hugging Face's
   per-layer activation checkpointing equals the map without, and the peak of
   ``torch.cuda.max_memory_allocated`` of each method against the no-grad forward's.
5. ``lrp``: AttnLRP, CP-LRP and the row engine against the input gradient on the Llama-style
   decoder at 16384 tokens: median time of three runs and peak allocated memory.
6. ``engine``: ``benchmarks/engine.py --device cuda`` on the Llama-style decoder at 16384 and
   32768 tokens (``row``, ``input-grad``, ``forward``); its log (with its tables) and its
   results file are copied to ``DIR``.
7. ``1b``: the same at 32768 tokens on the ~1.1B-parameter config in bfloat16, within 80 GB.

Results: ``DIR/gpu_check.json`` and ``.md`` (``--out DIR``, default ``benchmarks/results/``),
rewritten after every stage, with ``pytest_cuda.txt``, ``engine_*.log`` (with engine's tables)
and engine's own ``engine_cuda*_gpu.json``: 7 files, under the 8 a lent machine returns.

Needs: torch with CUDA, transformers, timm, pytest, matplotlib (engine's plot) and captum
(carry its wheel: it is pure Python; captum needs nothing the lent machine lacks). The
pretrained MiniLM is not needed. On the lent machine, from the repository root, with captum's
wheel in ``.whl`` (here: ``pip download --no-deps -d .whl captum==0.9.0``)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
    PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT

Here, without a GPU, ``--device cpu --quick`` runs the same code on the CPU as a smoke test (it
skips what needs CUDA and says so).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

STAGES = ("syncs", "tests", "split", "checkpointing", "lrp", "engine", "1b")
SHARE = {
    "tests": 150,
    "syncs": 100,
    "split": 20,
    "checkpointing": 90,
    "lrp": 60,
    "engine": 150,
    "1b": 120,
}
"""Seconds each stage needs at most; a stage starts only if that much is left."""


class Report:
    """The results so far, written to ``DIR/gpu_check.json`` and ``.md`` after each stage."""

    def __init__(self, out: Path) -> None:
        self.out, self.data = out, {}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, stage: str, result: object) -> None:
        self.data[stage] = result
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=1, default=str))
        lines = ["# GPU check (`benchmarks/gpu_check.py`)", ""]
        for name, value in self.data.items():
            lines += [f"## {name}", "", "```", json.dumps(value, indent=1, default=str), "```", ""]
        (self.out / "gpu_check.md").write_text("\n".join(lines))
        print(f"[{stage}] {json.dumps(result, default=str)[:2000]}", flush=True)


def run_tests(device: str, quick: bool, out: Path) -> dict:
    """``pytest -k cuda`` on the files that parametrise over ``cuda``; the whole output is
    saved as ``DIR/pytest_cuda.txt``."""
    if device != "cuda":
        return {"skipped": "needs CUDA"}
    files = ["tests/test_relevance.py", "tests/test_engine.py", "tests/test_metrics.py"]
    command = [sys.executable, "-m", "pytest", *files, "-k", "cuda", "-q", "-p", "no:cacheprovider"]
    log = out / "pytest_cuda.txt"
    with log.open("w") as handle:
        try:
            done = subprocess.run(
                command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                timeout=SHARE["tests"] - 10,
            )  # fmt: skip
            returncode: int | str = done.returncode
        except subprocess.TimeoutExpired:
            returncode = "timed out"
    tail = log.read_text()[-3000:]
    summary = [line for line in tail.splitlines() if "passed" in line or "failed" in line]
    return {"returncode": returncode, "summary": summary[-1:] or tail[-500:], "log": log.name}


def _llama(device: str, dtype: torch.dtype, layers: int = 4, checkpointing: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval().to(device, dtype)


QUICK = (
    "CheferRelevance/bert-2",
    "AttnLRP/bert-2",
    "CheferEncoderDecoder/bart",
    "perturbation_curve/text_metric",
    "pointing_game/localization",
)
"""The runs of ``--quick``: one of each kind."""

BF16 = ("CheferRelevance/llama", "AttentionRollout/llama", "AttnLRP/llama", "CPLRP/llama")
"""The runs repeated with the model and its float inputs in bfloat16."""


def _to(value: Any, device: str, dtype: torch.dtype) -> Any:
    """Tensors (in tuples, lists, dicts) on ``device``, floating ones in ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(item, device, dtype) for item in value)
    if isinstance(value, dict):
        return {key: _to(item, device, dtype) for key, item in value.items()}
    return value


def _frames(stack: list[traceback.FrameSummary]) -> tuple[traceback.FrameSummary, ...]:
    here = os.path.abspath(__file__)
    return tuple(
        frame
        for frame in stack
        if os.path.abspath(frame.filename) != here and not frame.filename.endswith("warnings.py")
    )


def _warned_syncs(run: Callable[[], object]) -> list[Any]:
    """The synchronising operations of ``run()`` as CUDA's sync debug mode warns of them, each
    as a ``device_sim.Event`` with the Python stack at the warning."""
    from device_sim import Event

    events: list[Any] = []

    def keep(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message).lower():
            stack = _frames(traceback.extract_stack())
            events.append(Event("cuda_sync", str(message).split("\n")[0][:80], stack))

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = keep
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return events


def _first_raise(run: Callable[[], object]) -> dict:
    """``run()`` under ``set_sync_debug_mode("error")``: whether it raised, and where."""
    from device_sim import Event

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    except RuntimeError as error:
        if "synchroniz" not in str(error).lower():
            raise
        event = Event("cuda_sync", "error", _frames(traceback.extract_tb(error.__traceback__)))
        owner = "package" if event.by_package else "model"
        return {"raised": True, "where": event.site, "by": owner, "at": list(event.where)}
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    return {"raised": False}


def _one_sync_check(label: str, budget_name: str, make: Callable[[], Any], device: str,
                    dtype: torch.dtype) -> dict:  # fmt: skip
    """One run: the simulated count (CPU), then on CUDA the warned syncs and the first raise."""
    import test_host_syncs as suite

    simulated, _ = suite.run_on_device(make())
    budget = suite.BUDGETS[budget_name]
    entry: dict = {
        "budget": budget.limit,
        "simulated package syncs": len(simulated.package_syncs),
        "simulated model syncs": len(simulated.syncs) - len(simulated.package_syncs),
        "simulated mixes": len(simulated.mixes),
    }
    run = make()
    if run.model is not None:
        run.model.to(device, dtype)
    tensors = _to(run.tensors, device, dtype)
    run.call(tensors)  # warm-up: lazy initialisation is not the method's (on a CPU: a smoke run)
    if device != "cuda":
        entry["cuda"] = "skipped: needs CUDA (ran once on the CPU)"
        return entry
    events = _warned_syncs(lambda: run.call(tensors))
    ours = [event for event in events if event.by_package]
    unlisted = [event.site for event in ours if event.where not in budget.sites]
    entry.update(
        {
            "cuda package syncs": len(ours),
            "cuda model syncs": len(events) - len(ours),
            "package sites": [event.site for event in ours],
            "model sites": sorted({event.site for event in events if not event.by_package}),
            "unlisted package sites": unlisted,
            "error mode": _first_raise(lambda: run.call(tensors)),
        }
    )
    entry["ok"] = not unlisted and len(ours) <= budget.limit
    return entry


def run_syncs(device: str, quick: bool) -> dict:
    """Every run of ``tests/test_host_syncs.py`` (each class on its models, every metric) on
    the device, under CUDA's sync debug mode, beside the simulated count; a few in bfloat16."""
    import test_host_syncs as suite

    runs = suite.all_runs()
    labels = list(runs)
    if quick:  # a smoke run: one of each kind
        labels = [label for label in labels if label in QUICK]
    planned = [(label, torch.float32) for label in labels]
    planned += [(label, torch.bfloat16) for label in (BF16[:1] if quick else BF16)]
    deadline = time.perf_counter() + SHARE["syncs"] - 5
    results: dict = {}
    for label, dtype in planned:
        name = label if dtype == torch.float32 else f"{label} bf16"
        if time.perf_counter() > deadline:
            results[name] = {"skipped": "the stage's time ran out"}
            continue
        budget_name, make = runs[label]
        try:
            results[name] = _one_sync_check(label, budget_name, make, device, dtype)
        except Exception as error:  # noqa: BLE001 - one run's failure must not stop the rest
            results[name] = {"error": f"{type(error).__name__}: {error}"[:1000]}
    checked = [entry for entry in results.values() if "ok" in entry]
    results["summary"] = {
        "runs": len(planned),
        "on cuda": len(checked),
        "within budget": sum(entry["ok"] for entry in checked),
        "errors": [label for label, entry in results.items() if "error" in entry],
        "cuda != simulated": [
            label
            for label, entry in results.items()
            if "cuda package syncs" in entry
            and entry["cuda package syncs"] != entry["simulated package syncs"]
        ],
    }
    return results


class SplitEncoder(nn.Module):
    """Embeddings and the first half of the layers on ``first``, the rest and the head on
    ``second``; the hidden states are moved between them."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(100, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.layers = nn.ModuleList([_copy(layer) for _ in range(4)])
        self.head = nn.Linear(32, 3)
        self.first, self.second = first, second
        self.embed.to(first)
        for index, block in enumerate(self.layers):
            block.to(first if index < 2 else second)
        self.head.to(second)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, ids):
        x = self.embed(ids.to(self.first))
        for index, block in enumerate(self.layers):
            x = block(x.to(self.first if index < 2 else self.second))
        return self.head(x[:, 0])


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def run_split(device: str, quick: bool) -> dict:
    from captum_chefer import AttnLRP, CheferRelevance

    second = device if device == "cuda" else "cpu"
    ids = torch.randint(0, 100, (2, 24))
    found = {}
    for method in (CheferRelevance, AttnLRP):
        single = method(SplitEncoder(second, second).eval()).attribute(ids, 1, output="token")
        split = method(SplitEncoder("cpu", second).eval()).attribute(ids, 1, output="token")
        error = ((split.cpu() - single.cpu()).abs().max() / single.abs().max()).item()
        found[method.__name__] = {"max rel diff": error, "equal within 1e-5": error <= 1e-5}
    return found


def _peak(run: Callable[[], object], device: str) -> float | None:
    if device != "cuda":
        run()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def run_checkpointing(device: str, quick: bool) -> dict:
    from captum_chefer import CheferRelevance

    n = 256 if quick else 16384
    model = _llama(device, torch.float32)
    tokens = torch.randint(3, 32000, (1, n), device=device)

    def explain():
        return CheferRelevance(lambda i: model(i, logits_to_keep=1).logits[:, -1], model).attribute(
            tokens, 42, output="token"
        )

    def input_grad():
        embeds = model.get_input_embeddings()(tokens).detach().requires_grad_()
        logit = model(inputs_embeds=embeds, logits_to_keep=1).logits[:, -1, 42]
        torch.autograd.grad(logit.sum(), embeds)

    def forward():
        with torch.no_grad():
            model(tokens, logits_to_keep=1)

    peaks = {"forward": _peak(forward, device), "input-grad": _peak(input_grad, device)}
    plain = explain()
    peaks["row"] = _peak(explain, device)
    model.train()
    # transformers before 5.2x has only the old name
    enable = getattr(model, "activation_checkpointing_enable", None)
    disable = getattr(model, "activation_checkpointing_disable", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (enable or model.gradient_checkpointing_enable)()
        checkpointed = explain()
        peaks["row-ckpt"] = _peak(explain, device)
        peaks["input-grad-ckpt"] = _peak(input_grad, device)
        (disable or model.gradient_checkpointing_disable)()
    model.eval()
    error = ((checkpointed - plain).abs().max() / plain.abs().max()).item()
    ratios = {}
    if peaks["forward"]:
        ratios = {k: v / peaks["forward"] for k, v in peaks.items() if v is not None}
    return {"n": n, "max rel diff ckpt vs plain": error, "peak MiB": peaks, "vs forward": ratios}


def run_lrp(device: str, quick: bool) -> dict:
    from captum_chefer import CPLRP, AttnLRP, CheferRelevance

    n = 256 if quick else 16384
    model = _llama(device, torch.float32)
    tokens = torch.randint(3, 32000, (1, n), device=device)

    def forward(ids):
        return model(ids, logits_to_keep=1).logits[:, -1]

    def input_grad():
        embeds = model.get_input_embeddings()(tokens).detach().requires_grad_()
        logit = model(inputs_embeds=embeds, logits_to_keep=1).logits[:, -1, 42]
        torch.autograd.grad(logit.sum(), embeds)

    methods = {
        "input-grad": input_grad,
        "row": lambda: CheferRelevance(forward, model).attribute(tokens, 42, output="token"),
        "attnlrp": lambda: AttnLRP(forward, model).attribute(tokens, 42),
        "cplrp": lambda: CPLRP(forward, model).attribute(tokens, 42),
    }
    found: dict = {"n": n, "median s": {}, "peak MiB": {}}
    for name, run in methods.items():
        found["peak MiB"][name] = _peak(run, device)
        times = []
        for _ in range(3):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        found["median s"][name] = sorted(times)[1]
    base_time, base_peak = found["median s"]["input-grad"], found["peak MiB"]["input-grad"]
    found["time vs input-grad"] = {k: v / base_time for k, v in found["median s"].items()}
    if base_peak:
        found["peak vs input-grad"] = {k: v / base_peak for k, v in found["peak MiB"].items()}
    return found


def run_engine(device: str, quick: bool, out: Path, config: str = "tiny") -> dict:
    """``benchmarks/engine.py --device cuda`` on the Llama-style decoder (row, input-grad,
    forward); its results (``benchmarks/results/engine_cuda*_gpu.json``) are copied to ``DIR``,
    and its log (with its tables) is kept there, so a run cut short keeps the cases it
    finished."""
    if device != "cuda":
        return {"skipped": "needs CUDA"}
    sizes = ["32768"] if config == "1b" else ["16384", "32768"]
    command = [
        sys.executable, "benchmarks/engine.py", "--device", "cuda", "--models", "llama",
        "--sizes", *sizes, "--methods", "row", "input-grad", "forward", "--repeats", "3",
        "--case-budget", "8", "--wait-idle", "0", "--retries", "0", "--config", config,
        "--tag", "gpu",
    ]  # fmt: skip
    share = SHARE["1b" if config == "1b" else "engine"]
    log = out / f"engine_{config}.log"
    with log.open("w") as handle:
        try:
            done = subprocess.run(
                command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, timeout=share - 5
            )
            returncode: int | str = done.returncode
        except subprocess.TimeoutExpired:
            returncode = "timed out (the finished cases are in the log)"
    stem = "engine_cuda" + ("_1b" if config == "1b" else "") + "_gpu"
    copied = []
    for suffix in (".json",):  # its tables are in the log (a lent machine returns 8 files)
        source = ROOT / "benchmarks" / "results" / f"{stem}{suffix}"
        if source.exists() and source.parent.resolve() != out.resolve():
            shutil.copy(source, out / source.name)
            copied.append(source.name)
    text = log.read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    return {"returncode": returncode, "table": table or text[-1500:], "files": copied}


RUNS: dict[str, Callable[[str, bool, Path], dict]] = {
    "tests": run_tests,
    "syncs": lambda device, quick, out: run_syncs(device, quick),
    "split": lambda device, quick, out: run_split(device, quick),
    "checkpointing": lambda device, quick, out: run_checkpointing(device, quick),
    "lrp": lambda device, quick, out: run_lrp(device, quick),
    "engine": run_engine,
    "1b": lambda device, quick, out: run_engine(device, quick, out, "1b"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (a CPU smoke test)")
    parser.add_argument("--budget", type=float, default=460.0, help="seconds for all stages")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    args = parser.parse_args(argv)
    report = Report(args.out)
    start = time.perf_counter()
    report.add("environment", _environment(args.device))
    for stage in args.stages:
        left = args.budget - (time.perf_counter() - start)
        if left < SHARE[stage] and not args.quick:
            report.add(stage, {"skipped": f"{left:.0f} s left, it needs up to {SHARE[stage]} s"})
            continue
        began = time.perf_counter()
        try:
            result = RUNS[stage](args.device, args.quick, args.out)
        except Exception as error:  # noqa: BLE001 - one stage's failure must not stop the rest
            result = {"error": f"{type(error).__name__}: {error}"[:2000]}
        if isinstance(result, dict):
            result["seconds"] = round(time.perf_counter() - began, 1)
        report.add(stage, result)
        gc.collect()  # the next stage (engine's subprocesses) gets the GPU's memory back
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _environment(device: str) -> dict:
    import transformers

    found = {"torch": torch.__version__, "transformers": transformers.__version__}
    if device == "cuda":
        found["gpu"] = torch.cuda.get_device_name(0)
        found["memory GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30)
    return found


if __name__ == "__main__":
    main()
