"""The GPU checks, in one script for one short use of a lent GPU (under 8 minutes).

Stages, in order of importance; each writes its results as soon as it is done, so a run cut
short keeps what it had, and a stage starts only if its share of the time is left:

1. ``tests``: the CUDA cases of the test suite (``pytest -k cuda`` on the files that
   parametrise over ``cuda``).
2. ``syncs``: ``torch.cuda.set_sync_debug_mode("warn")`` around one attribution of each class
   (BERT in float32, a Llama-style decoder in bfloat16) and two metrics, with every
   synchronising operation's Python site; the counts to compare with the CPU simulation of
   ``tests/test_host_syncs.py`` (at most 2 per relevance call, 0 for the LRP rules, 1 per
   metric call, a model's own aside).
3. ``split``: a model split across ``cpu`` and ``cuda:0`` gives the single-device map.
4. ``checkpointing``: a Llama-style decoder at 16384 tokens: the map with Hugging Face's
   per-layer activation checkpointing equals the map without, and the peak of
   ``torch.cuda.max_memory_allocated`` of each method against the no-grad forward's.
5. ``lrp``: AttnLRP, CP-LRP and the row engine against the input gradient on the Llama-style
   decoder at 16384 tokens: median time of three runs and peak allocated memory.
6. ``engine``: ``benchmarks/engine.py --device cuda`` on the Llama-style decoder at 16384 and
   32768 tokens (``row``, ``input-grad``, ``forward``).
7. ``1b``: the same at 32768 tokens on the ~1.1B-parameter config in bfloat16, within 80 GB.

Needs: torch with CUDA, transformers, pytest, and captum (carry its wheel: it is pure Python).
On the lent machine, from the repository root (``.whl`` holds captum's wheel)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py --out $OUT

Here, without a GPU, ``--device cpu --quick`` runs the same code on the CPU as a smoke test (it
skips what needs CUDA and says so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

STAGES = ("tests", "syncs", "split", "checkpointing", "lrp", "engine", "1b")
SHARE = {
    "tests": 150,
    "syncs": 60,
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


def run_tests(device: str, quick: bool) -> dict:
    if device != "cuda":
        return {"skipped": "needs CUDA"}
    files = ["tests/test_relevance.py", "tests/test_engine.py", "tests/test_metrics.py"]
    command = [sys.executable, "-m", "pytest", *files, "-k", "cuda", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=SHARE["tests"] - 10
    )
    tail = (done.stdout + done.stderr)[-3000:]
    summary = [line for line in tail.splitlines() if "passed" in line or "failed" in line]
    return {"returncode": done.returncode, "summary": summary[-1:] or tail[-500:], "tail": tail}


def _bert(device: str):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128,
    )  # fmt: skip
    return BertForSequenceClassification(config).eval().to(device)


def _llama(device: str, dtype: torch.dtype, layers: int = 4, checkpointing: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval().to(device, dtype)


def _sync_sites(run: Callable[[], object], device: str) -> dict:
    """The synchronising operations of ``run()``, by Python site (CUDA's sync debug mode)."""
    run()  # warm-up: lazy initialisation syncs are not the method's (on a CPU: a smoke test)
    if device != "cuda":
        return {"skipped": "needs CUDA (ran once on the CPU)"}
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = [
        f"{Path(w.filename).name}:{w.lineno}"
        for w in caught
        if "synchroniz" in str(w.message).lower()
    ]
    ours = [site for site in sites if _is_ours(site)]
    return {"syncs": len(sites), "ours": len(ours), "sites": sites}


_OURS = {path.name for path in (ROOT / "captum_chefer").rglob("*.py") if path.name != "__init__.py"}


def _is_ours(site: str) -> bool:
    return site.split(":")[0] in _OURS


def run_syncs(device: str, quick: bool) -> dict:
    from captum_chefer import (
        CPLRP,
        AttentionGradCAM,
        AttentionRollout,
        AttnLRP,
        CheferRelevance,
        GradientRollout,
        RawAttention,
    )
    from captum_chefer import metrics as M

    results: dict = {}
    bert = _bert(device)
    ids = torch.randint(5, 100, (2, 64), device=device)
    mask = torch.ones(2, 64, dtype=torch.long, device=device)
    mask[1, 40:] = 0
    classes = (CheferRelevance, RawAttention, AttentionRollout, AttentionGradCAM,
               GradientRollout, AttnLRP, CPLRP)  # fmt: skip
    for method in classes:
        explainer = method(lambda i, m: bert(i, attention_mask=m).logits, bert)
        run = lambda e=explainer: e.attribute(ids, 1, (mask,))  # noqa: E731
        results[f"bert fp32 {method.__name__}"] = _sync_sites(run, device)
    llama = _llama(device, torch.bfloat16)
    tokens = torch.randint(3, 32000, (1, 512), device=device)
    for method in (CheferRelevance, AttnLRP):
        explainer = method(lambda i: llama(i).logits[:, -1], llama)
        run = lambda e=explainer: e.attribute(tokens, 42)  # noqa: E731
        results[f"llama bf16 {method.__name__}"] = _sync_sites(run, device)
    maps = CheferRelevance(lambda i, m: bert(i, attention_mask=m).logits, bert).attribute(
        ids, 1, (mask,)
    )
    forward = lambda i, m: bert(i, attention_mask=m).logits  # noqa: E731
    results["comprehensiveness"] = _sync_sites(
        lambda: M.comprehensiveness(forward, ids, maps, target=1, attention_mask=mask,
                                    additional_forward_args=(mask,)), device,
    )  # fmt: skip
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


def run_engine(device: str, quick: bool, config: str = "tiny") -> dict:
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
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=share - 5)
    tail = (done.stdout + done.stderr)[-4000:]
    table = [line for line in tail.splitlines() if line.startswith("|")]
    return {"returncode": done.returncode, "table": table or tail[-1500:]}


RUNS = {
    "tests": run_tests,
    "syncs": run_syncs,
    "split": run_split,
    "checkpointing": run_checkpointing,
    "lrp": run_lrp,
    "engine": run_engine,
    "1b": lambda device, quick: run_engine(device, quick, "1b"),
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
            result = RUNS[stage](args.device, args.quick)
        except Exception as error:  # noqa: BLE001 - one stage's failure must not stop the rest
            result = {"error": f"{type(error).__name__}: {error}"[:2000]}
        if isinstance(result, dict):
            result["seconds"] = round(time.perf_counter() - began, 1)
        report.add(stage, result)


def _environment(device: str) -> dict:
    import transformers

    found = {"torch": torch.__version__, "transformers": transformers.__version__}
    if device == "cuda":
        found["gpu"] = torch.cuda.get_device_name(0)
        found["memory GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30)
    return found


if __name__ == "__main__":
    main()
