"""Run attribution methods over a dataset: per-example results in shards, resumable, on ranks.

One flow: the data is cut into batches and the batches into shards; each rank computes the
shards it owns (:meth:`Ranks.owns`) that are not already done and verified, writing each one
atomically; then rank 0 reads every shard, merges the metrics and writes the report. A batch
is computed the same way on any rank (same examples, same padding, same seed, same number of
threads), so per-example results do not depend on the number of ranks, bit for bit on CPU.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data import Batch, BatchSource, open_source
from .distributed import Ranks, join
from .methods import Explainer, LogitsOf, Method, as_method, bind, check_labels
from .scores import batch_scores
from .store import INDEX, JobResults, remove_partials, save_shard, verified_record, write_json


@dataclass(frozen=True)
class JobSettings:
    """How a job runs. Everything here except ``threads`` changes the job's fingerprint.

    Attributes:
        batches_per_shard: batches per shard (a shard is the unit of resume and of
            distribution).
        seed: seeds every (batch, method) computation, so stochastic methods are reproducible.
        threads: torch threads per process during the job (None: leave as set). Results are
            bit-identical across runs only at the same thread count.
        target: ``"predicted"`` explains the model's argmax class, ``"label"`` the data's label.
        max_examples_per_batch: perturbed copies per forward in the metrics.
        method_defaults: options our attention methods need for this model, e.g.
            ``{"token_index": "mean"}`` for a mean-pooled model (a method's options win).
    """

    batches_per_shard: int = 4
    seed: int = 0
    threads: int | None = 1
    target: str = "predicted"
    max_examples_per_batch: int = 256
    method_defaults: Mapping[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise ``ValueError`` on a bad setting, naming the fix."""
        if not isinstance(self.batches_per_shard, int) or self.batches_per_shard < 1:
            raise ValueError(
                f"batches_per_shard must be a positive int, got {self.batches_per_shard!r}."
            )
        if self.target not in ("predicted", "label"):
            raise ValueError(f"target must be 'predicted' or 'label', got {self.target!r}.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be None or >= 1, got {self.threads!r}.")


@dataclass
class JobSummary:
    """What one call of :func:`run_job` did.

    Attributes:
        folder: the job's output folder.
        rank: this process's rank; world: the number of ranks.
        computed: the shards this rank computed; skipped: those it found done and verified.
        report: the merged scores ``{method: {metric: value}}`` (rank 0 only, else None).
    """

    folder: Path
    rank: int
    world: int
    computed: list[int]
    skipped: list[int]
    report: dict[str, dict[str, float]] | None = None


def run_job(
    model: nn.Module,
    data: Any,
    methods: Sequence[Method | str | type | Callable[..., Tensor]],
    out: str | Path,
    *,
    tokenizer: Any = None,
    batch_size: int = 16,
    image_size: int = 224,
    settings: JobSettings | None = None,
    model_name: str | None = None,
    show_progress: bool | None = None,
    on_shard_done: Callable[[int], None] | None = None,
) -> JobSummary:
    """Explain and evaluate every example of ``data`` with each method; store, merge, report.

    Rerunning the same job in the same folder skips the shards that are done and verified and
    redoes the rest. Under ``torchrun --nproc_per_node=N`` each rank takes its share of the
    shards; rank 0 writes ``report.md``, ``report.png`` and ``summary.json``.

    Args:
        model: returns ``(B, C)`` logits (or an output with ``.logits``): ``model(ids, mask)``
            for text, ``model(images)`` for images. It is not modified (put it in eval mode).
        data: see :func:`~captum_chefer.jobs.data.open_source`: a DataLoader, texts, a tensor,
            a ``.jsonl``/``.csv`` file, a saved HF dataset or an image folder.
        methods: names (``"CheferRelevance"``, ``"IntegratedGradients"``), classes, callables
            or :class:`Method` objects with options.
        out: the output folder (created).
        tokenizer: for texts.
        batch_size: examples per batch.
        image_size: the side image files are resized to.
        settings: :class:`JobSettings` (default: its defaults).
        model_name: recorded in the index (default: the model's class).
        show_progress: a tqdm bar with examples per second (None: on a terminal only).
        on_shard_done: called with each shard's number once it is written.

    Returns:
        :class:`JobSummary`.

    Raises:
        ValueError: for bad settings, unknown methods, or a folder holding a different job.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> from captum_chefer.jobs import JobResults, run_job
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).eval()
        >>> folder = tempfile.mkdtemp()
        >>> summary = run_job(model, torch.rand(6, 3, 4, 4), ["Saliency", "InputXGradient"],
        ...                   folder, batch_size=2, show_progress=False)
        >>> summary.computed, sorted(summary.report)
        ([0], ['InputXGradient', 'Saliency'])
        >>> results = JobResults(folder)
        >>> len(results), results[5].attributions["Saliency"].shape
        (6, torch.Size([1, 4, 4]))
        >>> run_job(model, torch.rand(6, 3, 4, 4), ["Saliency"], folder, batch_size=2)
        Traceback (most recent call last):
        ...
        ValueError: ... holds a different job ...
    """
    settings = settings or JobSettings()
    settings.check()
    source = open_source(data, tokenizer=tokenizer, batch_size=batch_size, image_size=image_size)
    chosen = [as_method(m) for m in methods]
    check_labels(chosen)
    folder = Path(out)
    ranks = join(_device(model))
    threads = torch.get_num_threads()
    try:
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        job = _Job(model, source, chosen, folder, settings, ranks)
        return _run(job, model_name, show_progress, on_shard_done)
    finally:
        torch.set_num_threads(threads)
        ranks.close()


@dataclass
class _Job:
    """What every step of one run needs."""

    model: nn.Module
    source: BatchSource
    methods: list[Method]
    folder: Path
    settings: JobSettings
    ranks: Ranks

    @property
    def shards(self) -> int:
        return -(-self.source.num_batches() // self.settings.batches_per_shard)

    def batches(self, shard: int) -> set[int]:
        per_shard = self.settings.batches_per_shard
        return set(range(shard * per_shard, (shard + 1) * per_shard))

    def explainers(self) -> dict[str, Explainer]:
        tokenizer = getattr(self.source, "tokenizer", None)
        pad_id = 0 if tokenizer is None else (tokenizer.pad_token_id or 0)
        defaults = self.settings.method_defaults
        return {
            m.label: bind(m, self.model, self.source.kind, defaults, pad_id) for m in self.methods
        }


def _run(
    job: _Job,
    model_name: str | None,
    show_progress: bool | None,
    on_shard_done: Callable[[int], None] | None,
) -> JobSummary:
    index = _index(job, model_name)
    _claim(job.folder, index, job.ranks)
    explainers = job.explainers()
    mine = [shard for shard in range(job.shards) if job.ranks.owns(shard)]
    skipped = [shard for shard in mine if verified_record(job.folder, shard) is not None]
    todo = [shard for shard in mine if shard not in skipped]
    progress = _progress(job, todo, show_progress)
    for shard in todo:
        tensors, record = _compute_shard(job, explainers, job.batches(shard), progress)
        save_shard(job.folder, shard, tensors, {**record, "rank": job.ranks.rank})
        if on_shard_done is not None:
            on_shard_done(shard)
    progress.close()
    job.ranks.barrier()
    report = _finish(job.folder, index) if job.ranks.rank == 0 else None
    job.ranks.barrier()
    return JobSummary(job.folder, job.ranks.rank, job.ranks.world, todo, skipped, report)


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def _index(job: _Job, model_name: str | None) -> dict[str, Any]:
    from .. import __version__

    model, settings = job.model, job.settings
    identity = {
        "methods": [m.describe() for m in job.methods],
        "model": {
            "name": model_name or f"{type(model).__module__}.{type(model).__qualname__}",
            "parameters": sum(p.numel() for p in model.parameters()),
            "sha256": model_sha256(model),
        },
        "data": job.source.describe(),
        "settings": {k: v for k, v in asdict(settings).items() if k != "threads"},
        "shards": job.shards,
    }
    identity = json.loads(json.dumps(identity, default=repr, sort_keys=True))
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return {
        **identity,
        "format": "captum_chefer.jobs/1",
        "package": {"name": "captum_chefer", "version": __version__, "torch": torch.__version__},
        "fingerprint": fingerprint,
        "threads": settings.threads,
    }


def model_sha256(model: nn.Module) -> str:
    """SHA-256 over the model's state dict (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(
            tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def _claim(folder: Path, index: dict, ranks: Ranks) -> None:
    """Rank 0 writes the index, or checks that the folder holds this same job; all ranks check."""
    if ranks.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        previous = _read_index(folder)
        if previous is None:
            write_json(folder / INDEX, {**index, "complete": False})
        remove_partials(folder)
    ranks.barrier()
    previous = _read_index(folder)
    if previous is None or previous.get("fingerprint") != index["fingerprint"]:
        raise ValueError(
            f"{folder} holds a different job (other methods, options, model, data or settings); "
            "use a new output folder, or delete this one to start over."
        )


def _read_index(folder: Path) -> dict | None:
    path = folder / INDEX
    return json.loads(path.read_text()) if path.exists() else None


def _progress(job: _Job, todo: list[int], show_progress: bool | None) -> Any:
    from tqdm.auto import tqdm

    ranks = job.ranks
    examples = job.source.describe()["examples"]
    nominal = getattr(job.source, "batch_size", None) or 1
    total = min(examples, len(todo) * job.settings.batches_per_shard * nominal)
    return tqdm(
        total=total,
        unit="example",
        desc=f"rank {ranks.rank}/{ranks.world}" if ranks.world > 1 else "job",
        disable=show_progress is False or (show_progress is None and not _tty()),
        position=ranks.rank,
        dynamic_ncols=True,
    )


def _tty() -> bool:
    import sys

    return sys.stderr.isatty()


def _compute_shard(
    job: _Job, explainers: dict[str, Explainer], batches: set[int], progress: Any
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """One shard's tensors and its record (examples, seconds per method, start and end)."""
    tensors: dict[str, list[Tensor]] = {}
    seconds = dict.fromkeys(explainers, 0.0)
    began, first, last = time.time(), None, None
    device = _device(job.model)
    for index, batch in job.source.batches(batches):
        batch = batch.to(device)
        target = _target(job.model, batch, job.settings)
        _add(tensors, "examples", torch.arange(batch.start, batch.start + len(batch)))
        _add(tensors, "target", target.cpu())
        for position, (label, explain) in enumerate(explainers.items()):
            torch.manual_seed(_seed(job.settings.seed, index, position))
            started = time.perf_counter()
            relevance = explain(batch, target).detach().float()
            seconds[label] += time.perf_counter() - started
            _check_relevance(label, relevance, batch)
            _store_batch(job, tensors, batch, label, relevance, target)
        first = batch.start if first is None else first
        last = batch.start + len(batch)
        progress.update(len(batch))
    merged = {
        k: v[0] if k.startswith(("attr/", "input/")) else torch.cat(v) for k, v in tensors.items()
    }
    record = {"examples": [first, last], "seconds": seconds, "started": began}
    return merged, record | {"finished": time.time()}


def _add(tensors: dict[str, list[Tensor]], key: str, value: Tensor) -> None:
    tensors.setdefault(key, []).append(value)


def _seed(seed: int, batch: int, method: int) -> int:
    return (seed * 1_000_003 + batch * 1_009 + method) % (2**63)


def _target(model: nn.Module, batch: Batch, settings: JobSettings) -> Tensor:
    if settings.target == "label":
        if batch.labels is None:
            raise ValueError("target='label' needs labels in the data; use target='predicted'.")
        return batch.labels.long()
    with torch.no_grad():
        return LogitsOf(model)(*_forward_args(batch)).argmax(-1)


def _forward_args(batch: Batch) -> tuple[Tensor | None, ...]:
    return (batch.inputs,) if batch.kind == "image" else (batch.inputs, batch.attention_mask)


def _check_relevance(label: str, relevance: Tensor, batch: Batch) -> None:
    expected = (
        (len(batch), batch.inputs.shape[1])
        if batch.kind == "text"
        else (len(batch), 1, *batch.inputs.shape[2:])
    )
    if tuple(relevance.shape) != expected:
        raise ValueError(
            f"{label} returned relevance of shape {tuple(relevance.shape)}; the job expects "
            f"{expected} (one value per token, or per pixel)."
        )
    if not torch.isfinite(relevance).all():
        raise ValueError(f"{label} returned NaN or inf relevance on examples from {batch.start}.")


def _store_batch(
    job: _Job,
    tensors: dict[str, list[Tensor]],
    batch: Batch,
    label: str,
    relevance: Tensor,
    target: Tensor,
) -> None:
    """Add one method's per-example relevance, scores and curves on ``batch`` to ``tensors``."""
    cpu = relevance.cpu()
    for row in range(len(batch)):
        example = batch.start + row
        if batch.attention_mask is not None:  # text
            real = batch.attention_mask[row].bool().cpu()
            _add(tensors, f"attr/{label}/{example}", cpu[row][real])
            if f"input/{example}" not in tensors:
                _add(tensors, f"input/{example}", batch.inputs[row].cpu()[real])
        else:
            _add(tensors, f"attr/{label}/{example}", cpu[row])
    chunk = job.settings.max_examples_per_batch
    scores, curves = batch_scores(
        LogitsOf(job.model), batch, relevance, target, job.source.baseline, chunk
    )
    for name, values in scores.items():
        _add(tensors, f"score/{label}/{name}", values.cpu())
    for name, values in curves.items():
        _add(tensors, f"curve/{label}/{name}", values.cpu())


def _finish(folder: Path, index: dict) -> dict[str, dict[str, float]] | None:
    from .report import summarize, write_report

    results = JobResults(folder)
    if not results.complete:
        return None
    summary = summarize(results)
    write_report(results, summary, folder)
    write_json(folder / INDEX, {**index, "complete": True})
    return summary
