"""A job's files: safetensors shards, their records, the index, and lazy loading.

Layout of a job folder::

    index.json                 the job: methods, options, model, data, package version, and
                               each shard's range of examples
    shard-00000.safetensors    tensors of one shard (never pickle); its metadata names the job's
                               fingerprint and the shard's range of examples
    shard-00000.json           its record: examples, rank, seconds of attribution per method,
                               start and end times, the job's fingerprint, sha256 of the shard

A shard counts as done only when its record exists, the shard file's SHA-256 matches it, and
both the record and the shard's own metadata name this job's fingerprint, this shard and its
range of examples: a shard of another job is never read as this job's.

The job reads and writes only regular files it names itself, directly inside its folder: a
symbolic link, or a path resolving elsewhere, is refused. Every file is written to a temporary
name, flushed with ``fsync`` and renamed, so an interrupted write leaves a temporary file
(removed on the next run), never a half file under the real name.

Keys in a shard: ``attr/<method>/<example>`` (one example's relevance), ``input/<example>``
(its token ids, text only), ``score/<method>/<metric>`` and ``curve/<method>/<curve>`` (one row
per example of the shard), ``examples`` (the examples' indices), ``target`` (the explained
class), ``predicted`` (the model's class) and ``label`` (when the data has labels).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

INDEX = "index.json"
FORMAT = "captum_chefer.jobs/2"
TEMPORARY = ".partial"
REPORT_FILES = ("report.md", "report.png", "summary.json")
SHARD_FILE = re.compile(r"shard-(\d{5,})\.(?:safetensors|json)")
#: How to start over, named by every refusal.
START_OVER = (
    "choose a new --out folder, or rerun with --overwrite (overwrite=True in Python) to delete "
    "this folder's job files and start over"
)


class IncompleteResultsWarning(UserWarning):
    """Some of a job's shards are missing or fail verification; their examples are absent."""


def shard_path(folder: Path, shard: int) -> Path:
    """The safetensors file of ``shard``."""
    return inside(folder, f"shard-{_number(shard):05d}.safetensors")


def record_path(folder: Path, shard: int) -> Path:
    """The JSON record of ``shard``."""
    return inside(folder, f"shard-{_number(shard):05d}.json")


def _number(shard: Any) -> int:
    if not isinstance(shard, int) or isinstance(shard, bool) or shard < 0:
        raise ValueError(f"A shard number must be an int >= 0, got {shard!r}.")
    return shard


def inside(folder: Path, name: str) -> Path:
    """``folder / name``, refused unless it is (or would be) a regular file directly inside.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> inside(folder, "index.json") == folder / "index.json"
        True
        >>> inside(folder, "../index.json")
        Traceback (most recent call last):
        ...
        ValueError: '../index.json' is not a file name inside the job folder ...
    """
    if Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(
            f"{name!r} is not a file name inside the job folder {folder}; a job reads and "
            "writes only its own files there."
        )
    path = folder / name
    if path.is_symlink():
        raise ValueError(
            f"{path} is a symbolic link (to {os.readlink(path)}); a job reads and writes only "
            f"regular files inside its folder. Delete the link, or {START_OVER}."
        )
    if path.exists() and (not path.is_file() or path.resolve().parent != folder.resolve()):
        raise ValueError(
            f"{path} is not a regular file inside {folder}; a job reads and writes only its own "
            f"files there. Move it away, or {START_OVER}."
        )
    return path


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file is either absent or complete.

    The data goes to a new temporary file (never through an existing file or link), which is
    flushed and renamed over ``path``.
    """
    inside(path.parent, path.name)
    partial = path.with_name(path.name + f"{TEMPORARY}-{os.getpid()}")
    partial.unlink(missing_ok=True)  # a link or a leftover is removed, never followed
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(partial, flags, 0o644), "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON, atomically."""
    write_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def read_index(folder: Path) -> dict[str, Any] | None:
    """The folder's job index, None when there is none.

    Raises:
        ValueError: for an index that is damaged, not a job's, or of another format, naming
            the file and how to start over.
    """
    path = inside(folder, INDEX)
    if not path.exists():
        return None
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is damaged (not JSON: {error}), so the job in {folder} is unknown; "
            f"{START_OVER}."
        ) from error
    problem = _index_problem(index)
    if problem:
        raise ValueError(
            f"{path} is not the index of a captum_chefer job ({problem}); {START_OVER}."
        )
    return index


def _index_problem(index: Any) -> str | None:
    """What is wrong with a parsed index, or None."""
    if not isinstance(index, dict):
        return f"it holds a JSON {type(index).__name__}, not an object"
    if index.get("format") != FORMAT:
        found = index.get("format")
        return f"its format is {found!r}, this captum_chefer reads {FORMAT!r}"
    checks = {
        "fingerprint": isinstance(index.get("fingerprint"), str),
        "shards": _count(index.get("shards")),
        "methods": isinstance(index.get("methods"), list)
        and all(isinstance(m, dict) and isinstance(m.get("name"), str) for m in index["methods"]),
        "data": isinstance(index.get("data"), dict) and _count(index["data"].get("examples")),
        "shard_examples": _ranges(index.get("shard_examples"), index.get("shards")),
    }
    bad = [key for key, good in checks.items() if not good]
    return f"missing or malformed: {', '.join(bad)}" if bad else None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _ranges(value: Any, shards: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == shards
        and all(isinstance(r, list) and len(r) == 2 and all(map(_count, r)) for r in value)
    )


def save_shard(
    folder: Path,
    shard: int,
    tensors: dict[str, Tensor],
    record: dict[str, Any],
    fingerprint: str,
) -> dict[str, Any]:
    """Write a shard bound to its job, then its record (with the shard's SHA-256).

    Args:
        folder: the job folder.
        shard: the shard's number.
        tensors: its tensors.
        record: its record; ``record["examples"]`` is ``[start, end]``.
        fingerprint: the job's fingerprint, written into the shard's metadata and its record.

    Returns:
        The record as written.
    """
    from safetensors.torch import save

    start, end = record["examples"]
    metadata = {
        "format": "captum_chefer.jobs",
        "fingerprint": fingerprint,
        "shard": str(shard),
        "examples": f"{start}-{end}",
    }
    contiguous = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    data = save(contiguous, metadata=metadata)
    write_atomic(shard_path(folder, shard), data)
    record = {**record, "shard": shard, "fingerprint": fingerprint}
    record["sha256"] = hashlib.sha256(data).hexdigest()
    write_json(record_path(folder, shard), record)
    return record


@dataclass(frozen=True)
class ShardState:
    """What a shard's files hold, checked against the job.

    Attributes:
        shard: its number.
        status: ``"done"`` (verified, this job's), ``"missing"`` (no file), ``"damaged"`` (a file
            missing, unreadable or failing its checksum: redone) or ``"foreign"`` (intact, but
            another job's, or another shard's: never used).
        reason: why, in words (empty when done).
        record: its record when done.
    """

    shard: int
    status: str
    reason: str = ""
    record: dict[str, Any] | None = None


def shard_state(folder: Path, shard: int, fingerprint: str, examples: Sequence[int]) -> ShardState:
    """Check ``shard`` against the job: files, checksum, fingerprint, number and examples.

    Raises:
        ValueError: when one of its files is a symbolic link or not a regular file.
    """
    record_file, shard_file = record_path(folder, shard), shard_path(folder, shard)
    if not record_file.exists() and not shard_file.exists():
        return ShardState(shard, "missing", "not computed yet")
    if not shard_file.exists():
        return ShardState(shard, "damaged", f"{shard_file.name} is missing")
    record = _read_json(record_file)
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        return ShardState(shard, "damaged", f"{record_file.name} is missing or unreadable")
    if record["sha256"] != file_sha256(shard_file):
        return ShardState(shard, "damaged", f"{shard_file.name} fails its checksum")
    expected = {"fingerprint": fingerprint, "shard": str(shard), "examples": _span(examples)}
    metadata = _metadata(shard_file)
    found = {key: metadata.get(key) for key in expected}
    if found != expected:
        return ShardState(shard, "foreign", _foreign_reason(shard_file.name, expected, found))
    if not _record_agrees(record, expected):
        return ShardState(shard, "damaged", f"{record_file.name} disagrees with its shard")
    return ShardState(shard, "done", record=record)


def _span(examples: Sequence[int]) -> str:
    return f"{examples[0]}-{examples[1]}"


def _foreign_reason(name: str, expected: dict[str, str], found: dict[str, Any]) -> str:
    if found["fingerprint"] is None:
        return f"{name} carries no job fingerprint (another program's, or an older version's)"
    if found["fingerprint"] != expected["fingerprint"]:
        return (
            f"{name} is bound to job {found['fingerprint'][:12]}, this job is "
            f"{expected['fingerprint'][:12]}"
        )
    return (
        f"{name} holds shard {found['shard']}, examples {found['examples']}; this job's "
        f"shard {expected['shard']} holds examples {expected['examples']}"
    )


def _read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or not JSON."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _record_agrees(record: dict[str, Any], expected: dict[str, str]) -> bool:
    """Whether a record is well formed and names the same job, shard and examples."""
    examples, seconds = record.get("examples"), record.get("seconds")
    return (
        _count(record.get("shard"))
        and str(record["shard"]) == expected["shard"]
        and record.get("fingerprint") == expected["fingerprint"]
        and isinstance(examples, list)
        and len(examples) == 2
        and all(map(_count, examples))
        and _span(examples) == expected["examples"]
        and isinstance(seconds, dict)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seconds.values())
    )


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return handle.metadata() or {}
    except Exception:  # a checksum-valid file that safetensors cannot read: not this job's
        return {}


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def job_files(folder: Path) -> list[Path]:
    """The files of a job in ``folder``: index, shards, records, report, temporary files."""
    return sorted(path for path in folder.iterdir() if _job_file(path.name))


def _job_file(name: str) -> bool:
    base = name.split(f"{TEMPORARY}-")[0]
    return base in (INDEX, *REPORT_FILES) or SHARD_FILE.fullmatch(base) is not None


def remove_partials(folder: Path) -> None:
    """Delete temporary files left by an interrupted write (links are removed, not followed)."""
    for partial in folder.glob(f"*{TEMPORARY}-*"):
        partial.unlink(missing_ok=True)


def shard_ranges(index: dict[str, Any]) -> list[tuple[int, int]]:
    """Each shard's ``(start, end)`` range of examples, as the index records them."""
    return [(start, end) for start, end in index["shard_examples"]]


@dataclass
class Example:
    """One example's stored results.

    Attributes:
        index: its position in the dataset.
        target: the explained class.
        input_ids: ``(T,)`` its real tokens (text), or None (images are not stored).
        attributions: per method, ``(T,)`` over the real tokens or ``(1, H, W)``.
        scores: per method, ``{metric: value}``.
        predicted: the model's class (its argmax).
        label: the data's label, or None.
    """

    index: int
    target: int
    input_ids: Tensor | None
    attributions: dict[str, Tensor]
    scores: dict[str, dict[str, float]]
    predicted: int | None = None
    label: int | None = None


class JobResults:
    """A finished (or partly finished) job's results, read lazily, one example at a time.

    Only the index and the shard records are read up front (and each shard's checksum and
    metadata checked); ``results[i]`` opens the one shard holding example ``i`` and reads only
    its tensors. Files are safetensors: loading runs no code (no pickle). Shards that are missing
    or fail verification are named in an :class:`IncompleteResultsWarning`, listed in
    :attr:`missing`, and an ``index.json`` that says ``"complete": true`` is corrected.

    Args:
        folder: the job's output folder.
        warn: warn when shards are missing or unverified.

    Raises:
        FileNotFoundError: when the folder holds no job.
        ValueError: for a damaged or foreign index, or a symbolic link among the job's files.

    See :func:`~captum_chefer.jobs.run_job` for an example.
    """

    def __init__(self, folder: str | Path, *, warn: bool = True) -> None:
        self.folder = Path(folder)
        index = read_index(self.folder) if self.folder.is_dir() else None
        if index is None:
            raise FileNotFoundError(f"No job in {self.folder}: {INDEX} is missing.")
        self.index = index
        self.methods = [m["name"] for m in index["methods"]]
        fingerprint, ranges = index["fingerprint"], shard_ranges(index)
        states = [shard_state(self.folder, s, fingerprint, r) for s, r in enumerate(ranges)]
        self.records = [state.record for state in states if state.record is not None]
        self.missing = {state.shard: state.reason for state in states if state.status != "done"}
        self._where = {
            example: record["shard"]
            for record in self.records
            for example in range(*record["examples"])
        }
        if self.missing and warn:
            self._warn_incomplete(ranges)

    def _warn_incomplete(self, ranges: list[tuple[int, int]]) -> None:
        corrected = self._correct_index()
        shown = [f"shard {s} (examples {ranges[s][0]}-{ranges[s][1] - 1}): {why}"
                 for s, why in list(self.missing.items())[:8]]  # fmt: skip
        more = len(self.missing) - len(shown)
        warnings.warn(
            f"{self.folder}: {len(self.missing)} of {len(ranges)} shards are missing or "
            f"unverified, so {self.index['data']['examples'] - len(self)} examples are absent: "
            + "; ".join(shown)
            + (f"; and {more} more" if more > 0 else "")
            + (f". {INDEX} said complete; it now says not." if corrected else ".")
            + " Rerun the job (the same command) to redo them.",
            IncompleteResultsWarning,
            stacklevel=3,
        )

    def _correct_index(self) -> bool:
        """Mark the index incomplete when it says complete (best effort: the folder may be
        read-only); returns whether it was corrected."""
        if self.index.get("complete") is not True:
            return False
        try:
            write_json(inside(self.folder, INDEX), {**self.index, "complete": False})
        except OSError:
            return False
        self.index = {**self.index, "complete": False}
        return True

    def __len__(self) -> int:
        return len(self._where)

    @property
    def complete(self) -> bool:
        """Whether every shard is done and verified."""
        return not self.missing

    def __getitem__(self, example: int) -> Example:
        from safetensors import safe_open

        if example not in self._where:
            raise IndexError(
                f"Example {example} is not in the results ({len(self)} stored of "
                f"{self.index['data']['examples']}; rerun the job to finish it)."
            )
        shard = self._where[example]
        with safe_open(shard_path(self.folder, shard), framework="pt") as handle:
            keys = set(handle.keys())
            row = handle.get_tensor("examples").tolist().index(example)

            def value(key: str) -> Any:
                return handle.get_slice(key)[row : row + 1][0].item() if key in keys else None

            scores = {
                method: {
                    key.split("/")[2]: float(value(key))
                    for key in keys
                    if key.startswith(f"score/{method}/")
                }
                for method in self.methods
            }
            ids_key = f"input/{example}"
            return Example(
                example,
                int(value("target")),
                handle.get_tensor(ids_key) if ids_key in keys else None,
                {m: handle.get_tensor(f"attr/{m}/{example}") for m in self.methods},
                scores,
                value("predicted"),
                value("label"),
            )

    def __iter__(self) -> Iterator[Example]:
        for example in sorted(self._where):
            yield self[example]

    def table(self, prefix: str) -> dict[str, dict[str, Tensor]]:
        """``{method: {name: (N, ...)}}`` of every ``score`` or ``curve`` in example order."""
        parts: dict[str, dict[str, list[Tensor]]] = {}
        for key, tensor in self._tensors(lambda key: key.startswith(prefix + "/")):
            _, method, name = key.split("/")
            parts.setdefault(method, {}).setdefault(name, []).append(tensor)
        return {m: {n: torch.cat(v) for n, v in values.items()} for m, values in parts.items()}

    def column(self, key: str) -> Tensor | None:
        """``(N,)`` one per-example tensor (``"target"``, ``"predicted"``, ``"label"``) in
        example order, or None when a verified shard lacks it."""
        parts = [tensor for _, tensor in self._tensors(lambda name: name == key)]
        return torch.cat(parts) if len(parts) == len(self.records) and parts else None

    def _tensors(self, wanted: Any) -> Iterator[tuple[str, Tensor]]:
        from safetensors import safe_open

        for record in sorted(self.records, key=lambda r: r["shard"]):
            with safe_open(shard_path(self.folder, record["shard"]), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is no dict)
                    if wanted(key):
                        yield key, handle.get_tensor(key)
