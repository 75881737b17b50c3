"""What a running job tells its user: a bar on a terminal, log lines otherwise.

Messages go to the ``captum_chefer.jobs`` logger (the command line prints them on stderr): what
is resumed, which shards are skipped or redone, and, without a terminal, a line every
``every`` seconds and at each shard written, with the rate and the time left.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

LOG = logging.getLogger("captum_chefer.jobs")


def progress_mode(show_progress: bool | None) -> str:
    """``"bar"``, ``"log"`` or ``"off"``: None picks the bar on a terminal, log lines otherwise.

    Example:
        >>> progress_mode(False), progress_mode(True)
        ('off', 'bar')
    """
    if show_progress is None:
        return "bar" if sys.stderr.isatty() else "log"
    return "bar" if show_progress else "off"


def shard_list(shards: list[int]) -> str:
    """Shard numbers, runs shortened.

    Example:
        >>> shard_list([0, 1, 2, 5, 7, 8])
        '0-2, 5, 7-8'
    """
    runs: list[list[int]] = []
    for shard in sorted(shards):
        if runs and shard == runs[-1][-1] + 1:
            runs[-1].append(shard)
        else:
            runs.append([shard])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


class Progress:
    """Counts the examples computed and reports them.

    Args:
        total: the examples this process computes.
        prefix: starts every line (``"rank 1/2: "`` under torchrun, else empty).
        mode: ``"bar"`` (tqdm), ``"log"`` (lines every ``every`` seconds and per shard) or
            ``"off"``.
        every: seconds between log lines.
        position: the bar's line (one per rank).
    """

    def __init__(
        self, total: int, prefix: str, mode: str, every: float = 30.0, position: int = 0
    ) -> None:
        self.total, self.prefix, self.mode, self.every = total, prefix, mode, every
        self.done, self.began = 0, time.monotonic()
        self.last_line = self.began
        self.bar: Any = None
        if mode == "bar" and total > 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                unit="example",
                desc=prefix.rstrip(": ") or "job",
                position=position,
                dynamic_ncols=True,
            )

    def update(self, examples: int) -> None:
        """``examples`` more are done."""
        self.done += examples
        if self.bar is not None:
            self.bar.update(examples)
        elif self.mode == "log" and time.monotonic() - self.last_line >= self.every:
            self._line("")

    def shard_written(self, shard: int, examples: tuple[int, int]) -> None:
        """A shard is written (a log line without a terminal)."""
        if self.mode == "log":
            self._line(f"shard {shard} written (examples {examples[0]}-{examples[1] - 1}); ")

    def _line(self, lead: str) -> None:
        self.last_line = now = time.monotonic()
        rate = self.done / max(now - self.began, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        LOG.info(
            f"{self.prefix}{lead}{self.done}/{self.total} examples "
            f"({100 * self.done / max(self.total, 1):.0f} %), {rate:.2f} examples/s, "
            f"about {_duration(left)} left"
        )

    def close(self) -> None:
        """End the bar."""
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    """A duration in words.

    Example:
        >>> _duration(42), _duration(160), _duration(7300)
        ('42 s', '3 min', '2.0 h')
    """
    if seconds == float("inf"):
        return "an unknown time"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
