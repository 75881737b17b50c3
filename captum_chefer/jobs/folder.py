"""Claiming an output folder for a job: its own, an empty one, or (told so) another's, cleared.

Rank 0 looks at the folder before anything is computed. A folder holding another job's index
or shards is refused, naming what differs and how to start over (a new ``--out``, or
``--overwrite``); with ``overwrite`` only the files of a job (index, shards, records, report,
temporary files) are deleted, never anything else. A damaged shard of this job is redone; a
symbolic link among the job's files is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .distributed import Ranks
from .identity import differences
from .progress import shard_list
from .store import (
    INDEX,
    REPORT_FILES,
    SHARD_FILE,
    START_OVER,
    ShardState,
    inside,
    job_files,
    read_index,
    remove_partials,
    shard_ranges,
    shard_state,
    write_json,
)

IDENTITY = ("methods", "model", "data", "settings", "shards", "shard_examples")


def claim(folder: Path, index: dict[str, Any], ranks: Ranks, overwrite: bool) -> None:
    """Rank 0 checks the folder and writes the index; then every rank checks it is this job's.

    Raises:
        ValueError: for a folder holding another job, a damaged index, or a symbolic link,
            naming the file and the fix (on every rank).
    """
    failure: Exception | None = None
    if ranks.rank == 0:
        try:
            _prepare(folder, index, overwrite)
        except Exception as error:  # raised below, once every rank has reached the barrier
            failure = error
    ranks.barrier()
    if failure is not None:
        raise failure
    current = read_index(folder)
    if current is None or current["fingerprint"] != index["fingerprint"]:
        raise ValueError(f"Rank 0 did not claim {folder} for this job; its error says why.")


def _prepare(folder: Path, index: dict[str, Any], overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; --out (out=) must name a folder.")
    folder.mkdir(parents=True, exist_ok=True)
    if overwrite:
        clear(folder)
    files = job_files(folder)
    for path in files:
        inside(folder, path.name)  # refuses links and anything but a regular file
    previous = read_index(folder)
    if previous is not None and previous["fingerprint"] != index["fingerprint"]:
        if any(SHARD_FILE.fullmatch(path.name) for path in files):
            raise ValueError(_different_job(folder, previous, index))
        for name in REPORT_FILES:  # an earlier job that stored no results: nothing is lost
            (folder / name).unlink(missing_ok=True)
    foreign = foreign_shards(folder, index)
    if foreign:
        numbers = shard_list(list(foreign))
        raise ValueError(
            f"{folder} holds shard(s) {numbers} of another job ({next(iter(foreign.values()))})"
            f"; they are never mixed with this job's results. {START_OVER[0].upper()}"
            f"{START_OVER[1:]}."
        )
    remove_partials(folder)
    write_json(folder / INDEX, {**index, "complete": False})


def _different_job(folder: Path, previous: dict[str, Any], index: dict[str, Any]) -> str:
    changed = differences(
        {key: previous.get(key) for key in IDENTITY}, {key: index[key] for key in IDENTITY}
    )
    shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
    return (
        f"{folder} holds a different job (other methods, options, model, data or settings: "
        f"{shown or 'its fingerprint differs'}); {START_OVER}."
    )


def foreign_shards(folder: Path, index: dict[str, Any]) -> dict[int, str]:
    """The shards in ``folder`` that are intact but not this job's, with the reason for each."""
    ranges = shard_ranges(index)
    numbers = {
        int(match.group(1))
        for path in job_files(folder)
        if (match := SHARD_FILE.fullmatch(path.name))
    }
    foreign = {n: f"this job has {len(ranges)} shard(s)" for n in numbers if n >= len(ranges)}
    for number in sorted(n for n in numbers if n < len(ranges)):
        state = shard_state(folder, number, index["fingerprint"], ranges[number])
        if state.status == "foreign":
            foreign[number] = state.reason
    return dict(sorted(foreign.items()))


def clear(folder: Path) -> list[Path]:
    """Delete the job files in ``folder`` (links are removed, never followed); returns them."""
    files = job_files(folder)
    for path in files:
        if path.is_dir() and not path.is_symlink():
            raise ValueError(f"{path} is a folder where a job keeps a file; move it away.")
        path.unlink(missing_ok=True)
    return files


def shard_states(folder: Path, index: dict[str, Any], shards: list[int]) -> list[ShardState]:
    """The state of each of ``shards`` against the job (a foreign one is refused)."""
    ranges = shard_ranges(index)
    states = [shard_state(folder, s, index["fingerprint"], ranges[s]) for s in shards]
    foreign = [state.reason for state in states if state.status == "foreign"]
    if foreign:
        raise ValueError(
            f"{folder} holds shards of another job: {'; '.join(foreign)}; {START_OVER}."
        )
    return states
