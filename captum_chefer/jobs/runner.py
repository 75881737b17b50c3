"""Run attribution methods over a dataset: per-example results in shards, resumable, on ranks.

One flow, in two halves. First everything is checked and nothing is written: the settings,
the data (every row), the methods and their options, and the model, every method and the
metrics on the first example (:mod:`.checks`). Then rank 0 claims the output folder
(:mod:`.folder`), each rank computes the shards it owns (:meth:`Ranks.owns`) that are not
already done and verified, writing each one atomically and bound to the job, and rank 0 reads
every shard, merges the metrics and writes the report. A batch is computed the same way on any
rank (same examples, same padding, same seed, same number of threads), so per-example results
do not depend on the number of ranks, bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checks import rehearse
from .compute import compute_shard, model_device
from .data import BatchSource, open_source
from .distributed import Ranks, join
from .folder import claim, shard_states
from .identity import as_json, class_names, fingerprint, model_identity
from .methods import Explainer, Method, as_method, bind, check_labels, check_names
from .models import JobModel
from .progress import LOG, Progress, progress_mode, shard_list
from .store import FORMAT, INDEX, JobResults, ShardState, save_shard, write_json


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

    Example:
        >>> JobSettings(batches_per_shard=0).check()
        Traceback (most recent call last):
        ...
        ValueError: batches_per_shard must be a positive int, got 0.
    """

    batches_per_shard: int = 4
    seed: int = 0
    threads: int | None = 1
    target: str = "predicted"
    max_examples_per_batch: int = 256
    method_defaults: Mapping[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise ``ValueError`` on a bad setting, naming the fix."""
        for name in ("batches_per_shard", "max_examples_per_batch"):
            if not _positive(getattr(self, name)):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}.")
        if not _positive(self.seed + 1 if isinstance(self.seed, int) else None):
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}.")
        if self.target not in ("predicted", "label"):
            raise ValueError(f"target must be 'predicted' or 'label', got {self.target!r}.")
        if self.threads is not None and not _positive(self.threads):
            raise ValueError(f"threads must be None or a positive int, got {self.threads!r}.")
        if not isinstance(self.method_defaults, Mapping):
            raise ValueError(
                f"method_defaults must be a mapping of options, got {self.method_defaults!r}."
            )


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class JobSummary:
    """What one call of :func:`run_job` did.

    Attributes:
        folder: the job's output folder.
        rank: this process's rank; world: the number of ranks.
        computed: the shards this rank computed; skipped: those it found done and verified.
        report: the merged scores ``{method: {metric: value}}`` (rank 0 only, else None).
        redone: the shards of ``computed`` that were damaged, with the reason.
    """

    folder: Path
    rank: int
    world: int
    computed: list[int]
    skipped: list[int]
    report: dict[str, dict[str, float]] | None = None
    redone: dict[int, str] = field(default_factory=dict)


def run_job(
    model: nn.Module | JobModel,
    data: Any,
    methods: Sequence[Method | str | type | Callable[..., Tensor]],
    out: str | Path,
    *,
    tokenizer: Any = None,
    batch_size: int = 16,
    image_size: int = 224,
    settings: JobSettings | None = None,
    model_name: str | None = None,
    label_names: Sequence[str] | None = None,
    overwrite: bool = False,
    show_progress: bool | None = None,
    log_every: float = 30.0,
    on_shard_done: Callable[[int], None] | None = None,
) -> JobSummary:
    """Explain and evaluate every example of ``data`` with each method; store, merge, report.

    Everything is checked before anything is written: the settings, every row of the data,
    the methods and their options, and the model, each method and the metrics on the first
    example. So a mistake leaves ``out`` as it was, and the corrected call runs there.
    Rerunning the same job in the same folder skips the shards that are done and verified
    (bound to this job by its fingerprint) and redoes the rest; a folder holding another job is
    refused unless ``overwrite``. Under ``torchrun --nproc_per_node=N`` each rank takes its
    share of the shards; rank 0 writes ``report.md``, ``report.png`` and ``summary.json``.

    Args:
        model: returns ``(B, C)`` logits (or an output with ``.logits``): ``model(ids, mask)``
            for text, ``model(images)`` for images. It is not modified (put it in eval mode).
            A :class:`~captum_chefer.jobs.JobModel` (e.g. ``minilm_sentiment()``) brings its
            tokenizer, method defaults, name and class names.
        data: see :func:`~captum_chefer.jobs.data.open_source`: a DataLoader, texts, a tensor,
            a ``.jsonl``/``.csv`` file, a saved HF dataset or an image folder.
        methods: names (``"CheferRelevance"``, ``"IntegratedGradients"``), classes, callables
            or :class:`Method` objects with options.
        out: the output folder (created).
        tokenizer: for texts (default: the JobModel's).
        batch_size: examples per batch.
        image_size: the side image files are resized to.
        settings: :class:`JobSettings` (default: its defaults).
        model_name: recorded in the index (default: the JobModel's name, or the model's class).
        label_names: the class names in class-id order, to read labels written as names
            (default: the JobModel's ``class_names``, or the model config's ``id2label``).
        overwrite: delete the job files (index, shards, report) ``out`` holds and start over.
        show_progress: a tqdm bar (True), nothing (False), or (None) the bar on a terminal and
            log lines on the ``captum_chefer.jobs`` logger otherwise.
        log_every: seconds between progress lines without a terminal.
        on_shard_done: called with each shard's number once it is written.

    Returns:
        :class:`JobSummary`.

    Raises:
        ValueError: for bad settings, data, methods or options, a method failing on the first
            example, or a folder holding a different job; nothing is written then.

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
    built = _job_model(model, tokenizer, model_name, settings)
    names = class_names(built.model, label_names or built.class_names)
    source = open_source(
        data,
        tokenizer=built.tokenizer,
        batch_size=batch_size,
        image_size=image_size,
        label_names=names,
    )
    chosen = [as_method(m) for m in methods]
    check_labels(chosen)
    check_names(chosen)
    device = model_device(built.model)
    with _threads(settings.threads), torch.random.fork_rng(devices=_cuda_indices(device)):
        job = _Job(
            built.model,
            source,
            chosen,
            Path(out),
            replace(settings, method_defaults=built.method_defaults),
        )
        explainers = job.explainers()
        rehearse(job.model, job.source, explainers, job.options)
        index = _index(job, built.name, names)
        ranks = join(device)
        try:
            claim(job.folder, index, ranks, overwrite)
            return _run(
                job,
                index,
                explainers,
                ranks,
                progress_mode(show_progress),
                log_every,
                on_shard_done,
            )
        finally:
            ranks.close()


def _job_model(
    model: nn.Module | JobModel, tokenizer: Any, name: str | None, settings: JobSettings
) -> JobModel:
    """The model with what it brings, the caller's arguments winning."""
    if not isinstance(model, (nn.Module, JobModel)):
        raise TypeError(
            f"run_job needs an nn.Module or a JobModel (e.g. minilm_sentiment()), got "
            f"{type(model).__name__}."
        )
    built = model if isinstance(model, JobModel) else JobModel(model)
    if not isinstance(built.model, nn.Module):
        raise TypeError(f"JobModel.model must be an nn.Module, got {type(built.model).__name__}.")
    return JobModel(
        built.model,
        built.tokenizer if tokenizer is None else tokenizer,
        {**built.method_defaults, **settings.method_defaults},
        name or built.name,
        built.class_names,
    )


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(before)


def _cuda_indices(device: torch.device) -> list[int]:
    """The CUDA devices whose random state the job may change (restored after it)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@dataclass
class _Job:
    """What every step of one run needs."""

    model: nn.Module
    source: BatchSource
    methods: list[Method]
    folder: Path
    settings: JobSettings

    @property
    def shards(self) -> int:
        return -(-self.source.num_batches() // self.settings.batches_per_shard)

    def batches(self, shard: int) -> set[int]:
        per_shard = self.settings.batches_per_shard
        return set(range(shard * per_shard, (shard + 1) * per_shard))

    def shard_examples(self) -> list[list[int]]:
        """Each shard's ``[start, end)`` examples, from the batch sizes."""
        ends = [0, *accumulate(self.source.batch_sizes())]
        per_shard = self.settings.batches_per_shard
        return [
            [ends[s * per_shard], ends[min((s + 1) * per_shard, len(ends) - 1)]]
            for s in range(self.shards)
        ]

    @property
    def options(self) -> dict[str, Any]:
        """What the computation of a batch needs from the settings."""
        keys = ("seed", "target", "max_examples_per_batch")
        return {key: getattr(self.settings, key) for key in keys}

    def explainers(self) -> dict[str, Explainer]:
        tokenizer = getattr(self.source, "tokenizer", None)
        pad_id = 0 if tokenizer is None else (tokenizer.pad_token_id or 0)
        defaults = self.settings.method_defaults
        return {
            m.label: bind(m, self.model, self.source.kind, defaults, pad_id) for m in self.methods
        }


def _index(job: _Job, model_name: str | None, names: list[str] | None) -> dict[str, Any]:
    from .. import __version__

    identity = as_json(
        {
            "methods": [m.describe() for m in job.methods],
            "model": model_identity(job.model, model_name),
            "data": job.source.describe(),
            "settings": {k: v for k, v in asdict(job.settings).items() if k != "threads"},
            "shards": job.shards,
            "shard_examples": job.shard_examples(),
        }
    )
    return {
        **identity,
        "format": FORMAT,
        "package": {"name": "captum_chefer", "version": __version__, "torch": torch.__version__},
        "fingerprint": fingerprint(identity),
        "threads": job.settings.threads,
        "classes": names,
    }


def _run(
    job: _Job,
    index: dict[str, Any],
    explainers: dict[str, Explainer],
    ranks: Ranks,
    mode: str,
    log_every: float,
    on_shard_done: Callable[[int], None] | None,
) -> JobSummary:
    mine = [shard for shard in range(job.shards) if ranks.owns(shard)]
    states = shard_states(job.folder, index, mine)
    skipped = [state.shard for state in states if state.status == "done"]
    redone = {state.shard: state.reason for state in states if state.status == "damaged"}
    todo = [state.shard for state in states if state.status != "done"]
    prefix = f"rank {ranks.rank}/{ranks.world}: " if ranks.world > 1 else ""
    ranges = index["shard_examples"]
    total = sum(ranges[s][1] - ranges[s][0] for s in todo)
    _announce(prefix, job.folder, index, states, total)
    progress = Progress(total, prefix, mode, log_every, position=ranks.rank)
    try:
        for shard in todo:
            tensors, record = compute_shard(
                job.model, job.source, explainers, job.batches(shard), job.options, progress.update
            )
            _check_range(shard, record["examples"], ranges[shard])
            save_shard(
                job.folder, shard, tensors, {**record, "rank": ranks.rank}, index["fingerprint"]
            )
            progress.shard_written(shard, tuple(ranges[shard]))
            if on_shard_done is not None:
                on_shard_done(shard)
    finally:
        progress.close()
    ranks.barrier()
    report = _finish(job.folder, index) if ranks.rank == 0 else None
    ranks.barrier()
    return JobSummary(job.folder, ranks.rank, ranks.world, todo, skipped, report, redone)


def _announce(
    prefix: str, folder: Path, index: dict[str, Any], states: list[ShardState], todo_examples: int
) -> None:
    """Say what this run does: which shards are skipped (done and verified), redone, computed."""
    skipped = [state.shard for state in states if state.status == "done"]
    todo = [state.shard for state in states if state.status != "done"]
    whole = f"a job of {index['shards']} shard(s), {index['data']['examples']} examples"
    mine = f", {len(states)} of them this rank's" if prefix else ""
    LOG.info(f"{prefix}{folder}: {whole}{mine}")
    if skipped:
        LOG.info(f"{prefix}resuming: shard(s) {shard_list(skipped)} done and verified, skipped")
    for state in states:
        if state.status == "damaged":
            LOG.warning(f"{prefix}shard {state.shard}: {state.reason}; computing it again")
    if todo:
        LOG.info(f"{prefix}computing shard(s) {shard_list(todo)} ({todo_examples} examples)")
    else:
        LOG.info(f"{prefix}nothing left to compute")


def _check_range(shard: int, found: list[int], expected: list[int]) -> None:
    if list(found) != list(expected):
        raise ValueError(
            f"Shard {shard} computed examples {found[0]}-{found[1] - 1}, but the data's batch "
            f"sizes put examples {expected[0]}-{expected[1] - 1} there; the source's batches "
            "must match its batch_sizes()."
        )


def _finish(folder: Path, index: dict[str, Any]) -> dict[str, dict[str, float]]:
    from .report import summarize, write_report

    results = JobResults(folder, warn=False)
    if not results.complete:
        missing = "; ".join(f"shard {s}: {why}" for s, why in results.missing.items())
        raise ValueError(
            f"{folder}: after every rank finished, {missing}. Rerun the same command to redo them."
        )
    summary = summarize(results)
    write_report(results, summary, folder)
    write_json(folder / INDEX, {**index, "complete": True})
    LOG.info(f"report: {folder / 'report.md'}")
    return summary
