"""Ratio benchmark: the row engine against the input gradient, side by side, quiet and busy.

Every figure is a ratio of two methods timed in the same process, interleaved run by run, so
that whatever slows the machine slows both. The cases:

- ``minilm``: the pretrained all-MiniLM-L6-v2 (512 tokens, batch 4, one example half padded,
  a seeded linear head on CLS): ``CheferRelevance(mode="row")`` against the input gradient,
  once on a quiet machine and once with a busy neighbour, a process this benchmark starts
  (``while True: pass``, one core) and stops itself.
- ``vit``: a random-init ViT-B/16 at 224 (Hugging Face ``ViTConfig(num_labels=1000)``),
  batch 8, against the input gradient and the no-grad forward.
- ``lrp``: AttnLRP and CP-LRP (and the row engine) against the input gradient, side by side in
  one process: MiniLM-512 (batch 4) and the Llama-style decoder at ``--lrp-sizes`` tokens
  (4096 and 16384), time interleaved, peak memory of each method in a fresh process.
- ``llama``: the random-init Llama-style decoder of ``engine.py`` at 4096 and 16384 tokens
  (next-token logit only, ``logits_to_keep=1``): time against the input gradient, and peak
  memory against the no-grad forward's, each method in a fresh process (the peak RSS during
  the run: it is reset once the model is loaded, so loading does not count); also
  ``row-ckpt``, the row engine with Hugging Face's per-layer activation checkpointing.

``input-grad`` is a forward with grad and a backward to the input embeddings (or pixels)
only: the floor of any gradient method. The row relevance of MiniLM is also checked against a
float64 seed-style reference (``engine.seed_relevance`` on the model in float64).

Run from the repository root::

    .venv/bin/python benchmarks/ratios.py                 # all cases, ~10 min quiet
    .venv/bin/python benchmarks/ratios.py --cases minilm  # one case
    .venv/bin/python benchmarks/ratios.py --profile       # where the time goes (MiniLM)
    .venv/bin/python benchmarks/ratios.py --cases llama --sizes 16384 --memory-only
    .venv/bin/python benchmarks/ratios.py --cases lrp --tag lrp        # AttnLRP and CP-LRP

Outputs ``benchmarks/results/ratios.{json,md}`` (``ratios_profile.md`` with ``--profile``).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from captum_chefer import CheferRelevance  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GOALS = [  # (case, ours, baseline, metric, limit)
    ("minilm quiet", "row", "input-grad", "time", 1.1),
    ("minilm busy", "row", "input-grad", "time", 1.3),
    ("vit", "row", "input-grad", "time", 1.2),
    ("llama 16384", "row", "forward", "peak RSS", 1.05),
    ("llama 16384", "row-ckpt", "forward", "peak RSS", 1.15),
    ("llama 16384", "input-grad-ckpt", "forward", "peak RSS", 1.15),
    *[
        (f"lrp {case}", rule, "input-grad", metric, limit)
        for case in ("minilm 512", "llama 4096", "llama 16384")
        for rule in ("attnlrp", "cplrp")
        for metric, limit in (("time", 1.2), ("peak RSS", 1.05))
    ],
]


class _ViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        torch.manual_seed(0)
        self.model = ViTForImageClassification(
            ViTConfig(num_labels=1000, attn_implementation="sdpa")
        ).eval()

    def forward(self, pixels):
        return self.model(pixel_values=pixels).logits


def minilm_methods():
    w = engine.load_minilm(512, "cpu", torch.float32)
    return w, {
        "row": lambda: engine.chefer_relevance(w, "row", None),
        "input-grad": lambda: engine.input_grad(w),
    }


def lrp_methods(case: str) -> dict:
    """Row, AttnLRP, CP-LRP and the input gradient on one workload: ``"minilm 512"`` or
    ``"llama N"``."""
    from captum_chefer import CPLRP, AttnLRP

    model, n = case.split()
    if model == "minilm":
        w = engine.load_minilm(int(n), "cpu", torch.float32)
    else:
        w = engine.load_llama(int(n), "cpu", torch.float32, "tiny", last_logit_only=True)

    def lrp(method):
        return method(w.explained).attribute(
            w.ids, target=w.target, additional_forward_args=w.forward_args
        )

    return {
        "row": lambda: engine.chefer_relevance(w, "row", None),
        "attnlrp": lambda: lrp(AttnLRP),
        "cplrp": lambda: lrp(CPLRP),
        "input-grad": lambda: engine.input_grad(w),
    }


def _lrp_peak_child(case: str, method: str, queue) -> None:
    methods = lrp_methods(case)
    gc.collect()
    loaded = engine.rss_now_mb()
    Path("/proc/self/clear_refs").write_text("5")
    methods[method]()
    queue.put((loaded, _vm_hwm_mib()))


def lrp_case(case: str, repeats: int) -> dict:
    methods = lrp_methods(case)
    times = interleaved(methods, repeats)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {"median_s": medians, "runs_s": times, "load": os.getloadavg()[0], "ratios": {}}
    del methods
    gc.collect()
    context = mp.get_context("spawn")
    peaks, loads = {}, {}
    for name in ("input-grad", "row", "attnlrp", "cplrp"):
        queue = context.Queue()
        child = context.Process(target=_lrp_peak_child, args=(case, name, queue))
        child.start()
        loads[name], peaks[name] = queue.get()
        child.join()
    result["peak_rss_mib"], result["rss_load_mib"] = peaks, loads
    for rule in ("attnlrp", "cplrp"):
        result["ratios"][f"{rule} / input-grad"] = medians[rule] / medians["input-grad"]
        result["ratios"][f"{rule} / row"] = medians[rule] / medians["row"]
        result["ratios"][f"peak RSS {rule} / input-grad"] = peaks[rule] / peaks["input-grad"]
    return {f"lrp {case}": result}


def vit_methods():
    model = _ViT()
    pixels = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    explainer = CheferRelevance(model)

    def input_grad():
        leaf = pixels.clone().requires_grad_()
        torch.autograd.grad(model(leaf)[:, 3].sum(), leaf)

    def forward():
        with torch.no_grad():
            model(pixels)

    return {
        "row": lambda: explainer.attribute(pixels, target=3, output="token"),
        "input-grad": input_grad,
        "forward": forward,
    }


def llama_methods(n: int):
    w = engine.load_llama(n, "cpu", torch.float32, "tiny", last_logit_only=True)
    return {
        "row": lambda: engine.chefer_relevance(w, "row", None),
        "row-ckpt": lambda: checkpointed(w, lambda: engine.chefer_relevance(w, "row", None)),
        "input-grad": lambda: engine.input_grad(w),
        "input-grad-ckpt": lambda: checkpointed(w, lambda: engine.input_grad(w)),
        "forward": lambda: engine.no_grad_forward(w),
    }


def checkpointed(w, method):
    """``method()`` on the same model with Hugging Face's per-layer activation checkpointing
    (non-reentrant, its default). Hugging Face checkpoints only in training mode; the model has
    no dropout, so train mode computes the same function. The model is put back as it was."""
    import warnings

    model = w.explained.model
    model.train()
    model.activation_checkpointing_enable()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # training mode, without dropout
            return method()
    finally:
        model.activation_checkpointing_disable()
        model.eval()


def interleaved(methods: dict, repeats: int) -> dict[str, list[float]]:
    """Time each method ``repeats`` times, rotating the order every round, after one warmup."""
    for function in methods.values():
        function()
    names, times = list(methods), {name: [] for name in methods}
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            gc.collect()
            start = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - start)
    return times


def summary(times: dict[str, list[float]], baselines: tuple[str, ...]) -> dict:
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = {
        f"row / {base}": medians["row"] / medians[base] for base in baselines if base in medians
    }
    return {"median_s": medians, "runs_s": times, "ratios": ratios, "load": os.getloadavg()[0]}


def busy_neighbour():
    """A process that keeps one core busy until it is killed."""
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)
    return process


def minilm_case(repeats: int) -> dict:
    w, methods = minilm_methods()
    row = engine.chefer_relevance(w, "row", None)
    reference = float64_reference(w)
    error = ((row.double() - reference).abs().max() / reference.abs().max()).item()
    quiet = summary(interleaved(methods, repeats), ("input-grad",))
    neighbour = busy_neighbour()
    try:
        busy = summary(interleaved(methods, repeats), ("input-grad",))
    finally:
        neighbour.kill()
        neighbour.wait()
    return {"minilm quiet": quiet, "minilm busy": busy, "minilm float64 rel diff": error}


def float64_reference(w) -> torch.Tensor:
    """The seed-style relevance of the same model and inputs in float64, at eager."""
    w.explained.double()
    w.explained.model.set_attn_implementation("eager")
    try:
        return engine.seed_relevance(w).double()
    finally:
        w.explained.float()
        w.explained.model.set_attn_implementation("sdpa")


def _peak_child(n: int, method: str, queue) -> None:
    methods = llama_methods(n)
    gc.collect()
    loaded = engine.rss_now_mb()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    methods[method]()
    queue.put((loaded, _vm_hwm_mib()))


def _vm_hwm_mib() -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def peak_rss(n: int, method: str) -> tuple[float, float]:
    """(RSS before the run, peak RSS during it) in MiB, in a fresh process that runs ``method``
    once after loading the model (the peak is reset after loading, so loading does not count)."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_peak_child, args=(n, method, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def llama_case(n: int, repeats: int, memory_only: bool = False) -> dict:
    methods = llama_methods(n)
    if memory_only:
        result = {"median_s": {}, "runs_s": {}, "ratios": {}, "load": os.getloadavg()[0]}
    else:
        result = summary(interleaved(methods, repeats), ("input-grad", "forward"))
        medians = result["median_s"]
        result["ratios"]["row-ckpt / input-grad-ckpt"] = (
            medians["row-ckpt"] / medians["input-grad-ckpt"]
        )
    del methods
    gc.collect()
    names = ("forward", "input-grad", "input-grad-ckpt", "row", "row-ckpt")
    memory = {name: peak_rss(n, name) for name in names}
    result["rss_load_mib"] = {name: loaded for name, (loaded, _) in memory.items()}
    result["peak_rss_mib"] = {name: peak for name, (_, peak) in memory.items()}
    peaks, loads = result["peak_rss_mib"], result["rss_load_mib"]
    result["ratios"]["peak RSS row / forward"] = peaks["row"] / peaks["forward"]
    result["ratios"]["peak RSS row / input-grad"] = peaks["row"] / peaks["input-grad"]
    result["ratios"]["peak RSS row-ckpt / forward"] = peaks["row-ckpt"] / peaks["forward"]
    result["ratios"]["peak RSS row-ckpt / input-grad-ckpt"] = (
        peaks["row-ckpt"] / peaks["input-grad-ckpt"]
    )
    result["ratios"]["RSS increment row / forward"] = (peaks["row"] - loads["row"]) / max(
        1.0, peaks["forward"] - loads["forward"]
    )
    return {f"llama {n}": result}


def goals_table(results: dict) -> list[str]:
    lines = ["| goal | ours | baseline | ratio | limit | result |", "|---|---|---|---|---|---|"]
    for case, ours, base, metric, limit in GOALS:
        if case not in results:
            continue
        r = results[case]
        if metric == "time":
            ratio = r["median_s"][ours] / r["median_s"][base]
            mine, theirs = f"{r['median_s'][ours]:.3f} s", f"{r['median_s'][base]:.3f} s"
        else:
            peaks = r["peak_rss_mib"]
            ratio = peaks[ours] / peaks[base]
            mine, theirs = f"{peaks[ours]:.0f} MiB", f"{peaks[base]:.0f} MiB"
        verdict = "PASS" if ratio <= limit else "FAIL"
        name = f"{case}: {metric} {ours} / {base}"
        lines.append(f"| {name} | {mine} | {theirs} | {ratio:.3f} | <= {limit} | {verdict} |")
    return lines


def cases_table(results: dict) -> list[str]:
    lines = ["| case | method | median s | runs | ratios | load avg |", "|---|---|---|---|---|---|"]
    for case, r in results.items():
        if not isinstance(r, dict):
            continue
        ratios = ", ".join(f"{k} {v:.3f}" for k, v in r["ratios"].items())
        for index, (name, median) in enumerate(r["median_s"].items()):
            runs = len(r["runs_s"][name])
            shown = ratios if index == 0 else ""
            lines.append(f"| {case} | {name} | {median:.3f} | {runs} | {shown} | {r['load']:.2f} |")
    return lines


def memory_table(results: dict) -> list[str]:
    lines = ["| case | method | RSS after load MiB | peak RSS MiB | increment MiB |"]
    lines.append("|---|---|---|---|---|")
    for case, r in results.items():
        if isinstance(r, dict) and "peak_rss_mib" in r:
            for name, peak in r["peak_rss_mib"].items():
                loaded = r["rss_load_mib"][name]
                row = f"| {case} | {name} | {loaded:.0f} | {peak:.0f} | {peak - loaded:.0f} |"
                lines.append(row)
    return lines


def write(results: dict, stem: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1))
    text = [
        "# Ratio benchmark (cpu)",
        "",
        "`benchmarks/ratios.py`, torch threads: "
        f"{torch.get_num_threads()}, cores: {os.cpu_count()}",
        "",
        "## Goals",
        "",
    ]
    text += goals_table(results) + ["", "## Time", ""] + cases_table(results)
    text += ["", "## Peak memory (each method in a fresh process)", ""] + memory_table(results)
    if "minilm float64 rel diff" in results:
        error = results["minilm float64 rel diff"]
        text += ["", f"MiniLM row vs the float64 seed: max rel diff {error:.1e}"]
    (RESULTS / f"{stem}.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


def profile(rows: int = 20) -> None:
    """Operators by self CPU time, row against the input gradient, MiniLM-512 (quiet)."""
    from torch.profiler import ProfilerActivity, profile

    _, methods = minilm_methods()
    text = ["# Where the time goes: MiniLM-512, batch 4 (`benchmarks/ratios.py --profile`)", ""]
    for name, function in methods.items():
        function()
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            function()
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
        text += [f"## {name}", "", "```", table, "```", ""]
    (RESULTS / "ratios_profile.md").write_text("\n".join(text))
    print("\n".join(text))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["minilm", "vit", "llama", "lrp"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[4096, 16384], help="Llama N")
    parser.add_argument(
        "--lrp-sizes", nargs="+", type=int, default=[4096, 16384], help="Llama N of the lrp case"
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--tag", default="", help="output suffix")
    parser.add_argument(
        "--memory-only", action="store_true", help="Llama: peak memory only, no timing"
    )
    args = parser.parse_args(argv)
    engine._quiet_transformers()
    if args.profile:
        profile()
        return
    results: dict = {}
    if "minilm" in args.cases:
        results.update(minilm_case(args.repeats))
    if "vit" in args.cases:
        times = interleaved(vit_methods(), args.repeats)
        results["vit"] = summary(times, ("input-grad", "forward"))
    if "lrp" in args.cases:
        results.update(lrp_case("minilm 512", args.repeats))
        for n in args.lrp_sizes:
            results.update(lrp_case(f"llama {n}", max(2, args.repeats // (2 if n < 8192 else 3))))
    if "llama" in args.cases:
        for n in args.sizes:
            repeats = max(2, args.repeats // (2 if n < 8192 else 3))
            results.update(llama_case(n, repeats, args.memory_only))
    write(results, "ratios" + (f"_{args.tag}" if args.tag else ""))


if __name__ == "__main__":
    main()
