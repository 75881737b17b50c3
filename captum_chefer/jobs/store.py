"""A job's files: safetensors shards, their records, the index, and lazy loading.

Layout of a job folder::

    index.json                 the job: methods, options, model, data, package version
    shard-00000.safetensors    tensors of one shard (never pickle)
    shard-00000.json           its record: examples, rank, seconds of attribution per method,
                               start and end times, sha256 of the shard file

A shard counts as done only when its record exists and the shard file's SHA-256 matches it.
Files are written to a temporary name, flushed with ``fsync`` and renamed, so an interrupted
write leaves a temporary file (removed on the next run), never a half shard under the real name.

Keys in a shard: ``attr/<method>/<example>`` (one example's relevance), ``input/<example>``
(its token ids, text only), ``score/<method>/<metric>`` and ``curve/<method>/<curve>`` (one row
per example of the shard), ``examples`` (the examples' indices) and ``target``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

INDEX = "index.json"
TEMPORARY = ".partial"


def shard_path(folder: Path, shard: int) -> Path:
    """The safetensors file of ``shard``."""
    return folder / f"shard-{shard:05d}.safetensors"


def record_path(folder: Path, shard: int) -> Path:
    """The JSON record of ``shard``."""
    return folder / f"shard-{shard:05d}.json"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file is either absent or complete."""
    partial = path.with_name(path.name + f"{TEMPORARY}-{os.getpid()}")
    with partial.open("wb") as handle:
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


def save_shard(
    folder: Path, shard: int, tensors: dict[str, Tensor], record: dict[str, Any]
) -> dict[str, Any]:
    """Write a shard and then its record (with the shard's SHA-256); returns the record."""
    from safetensors.torch import save

    contiguous = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    data = save(contiguous, metadata={"format": "captum_chefer.jobs", "shard": str(shard)})
    write_atomic(shard_path(folder, shard), data)
    record = {**record, "shard": shard, "sha256": hashlib.sha256(data).hexdigest()}
    write_json(record_path(folder, shard), record)
    return record


def verified_record(folder: Path, shard: int) -> dict[str, Any] | None:
    """The shard's record if the shard is complete and its checksum matches, else None."""
    record_file, shard_file = record_path(folder, shard), shard_path(folder, shard)
    if not (record_file.exists() and shard_file.exists()):
        return None
    try:
        record = json.loads(record_file.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("sha256") != file_sha256(shard_file):
        return None
    return record


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_partials(folder: Path) -> None:
    """Delete temporary files left by an interrupted write."""
    for partial in folder.glob(f"*{TEMPORARY}-*"):
        partial.unlink(missing_ok=True)


@dataclass
class Example:
    """One example's stored results.

    Attributes:
        index: its position in the dataset.
        target: the explained class.
        input_ids: ``(T,)`` its real tokens (text), or None (images are not stored).
        attributions: per method, ``(T,)`` over the real tokens or ``(1, H, W)``.
        scores: per method, ``{metric: value}``.
    """

    index: int
    target: int
    input_ids: Tensor | None
    attributions: dict[str, Tensor]
    scores: dict[str, dict[str, float]]


class JobResults:
    """A finished (or partly finished) job's results, read lazily, one example at a time.

    Only the index and the shard records are read up front; ``results[i]`` opens the one shard
    holding example ``i`` and reads only its tensors. Files are safetensors: loading runs no
    code (no pickle).

    Args:
        folder: the job's output folder.

    See :func:`~captum_chefer.jobs.run_job` for an example.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index_file = self.folder / INDEX
        if not index_file.exists():
            raise FileNotFoundError(f"No job in {self.folder}: {INDEX} is missing.")
        self.index = json.loads(index_file.read_text())
        self.methods = [m["name"] for m in self.index["methods"]]
        self.records = [
            record
            for shard in range(self.index["shards"])
            if (record := verified_record(self.folder, shard)) is not None
        ]
        self._where = {
            example: record["shard"]
            for record in self.records
            for example in range(*record["examples"])
        }

    def __len__(self) -> int:
        return len(self._where)

    @property
    def complete(self) -> bool:
        """Whether every shard is done and verified."""
        return len(self.records) == self.index["shards"]

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
            scores = {
                method: {
                    key.split("/")[2]: float(handle.get_slice(key)[row : row + 1][0])
                    for key in keys
                    if key.startswith(f"score/{method}/")
                }
                for method in self.methods
            }
            ids_key = f"input/{example}"
            return Example(
                example,
                int(handle.get_slice("target")[row : row + 1][0]),
                handle.get_tensor(ids_key) if ids_key in keys else None,
                {m: handle.get_tensor(f"attr/{m}/{example}") for m in self.methods},
                scores,
            )

    def __iter__(self) -> Iterator[Example]:
        for example in sorted(self._where):
            yield self[example]

    def table(self, prefix: str) -> dict[str, dict[str, Tensor]]:
        """``{method: {name: (N, ...)}}`` of every ``score`` or ``curve`` in example order."""
        from safetensors import safe_open

        parts: dict[str, dict[str, list[Tensor]]] = {}
        for record in sorted(self.records, key=lambda r: r["shard"]):
            with safe_open(shard_path(self.folder, record["shard"]), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is no dict)
                    kind, method, name = (key.split("/") + ["", ""])[:3]
                    if kind == prefix:
                        parts.setdefault(method, {}).setdefault(name, []).append(
                            handle.get_tensor(key)
                        )
        return {m: {n: torch.cat(v) for n, v in values.items()} for m, values in parts.items()}
