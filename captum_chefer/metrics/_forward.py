"""Batched, chunked forwards of perturbed inputs, and Captum's target conventions.

Rows of the perturbed batch are ordered example-major: row ``r`` copies example ``r // S`` at
step ``r % S``. Targets and batched ``additional_forward_args`` follow their example, which is
what Captum's ``_expand_target`` / ``_expand_additional_forward_args`` do when inputs are
repeated (``repeat_interleave`` expansion).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ._features import Baseline, FeatureRanking, PerturbedRows

TargetType = int | tuple[int, ...] | Tensor | list[int] | list[tuple[int, ...]] | None
ScoreName = Literal["prob", "logit", "correct"]
SCORES = ("prob", "logit", "correct")
Reduce = Callable[[Any, Tensor], Tensor]


@dataclass(frozen=True)
class ForwardSetup:
    """What every chunked forward of one metric call shares."""

    forward_func: Callable[..., Any]
    inputs: tuple[Tensor, ...]
    baselines: tuple[Baseline, ...]
    additional_forward_args: tuple[Any, ...]
    max_examples_per_batch: int | None
    show_progress: bool | None
    description: str

    @property
    def batch(self) -> int:
        return self.inputs[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.inputs[0].device


def check_score(score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}.")


def check_chunk(max_examples_per_batch: int | None) -> None:
    bad_type = isinstance(max_examples_per_batch, bool) or not isinstance(
        max_examples_per_batch, (int, type(None))
    )
    if bad_type or (max_examples_per_batch is not None and max_examples_per_batch < 1):
        raise ValueError(
            "max_examples_per_batch must be None or a positive int, "
            f"got {max_examples_per_batch!r}."
        )


def format_additional_forward_args(args: Any) -> tuple[Any, ...]:
    """Captum's convention: None is no argument, a non-tuple is one argument."""
    if args is None:
        return ()
    return args if isinstance(args, tuple) else (args,)


def _rows_of_args(args: tuple[Any, ...], example: Tensor, batch: int) -> tuple[Any, ...]:
    """Tensors with a batch dimension follow their example; anything else is passed as is."""
    return tuple(
        a[example.to(a.device)] if isinstance(a, Tensor) and a.dim() and a.shape[0] == batch else a
        for a in args
    )


def run_perturbed(
    setup: ForwardSetup, ranking: FeatureRanking, counts: Tensor, keep: Tensor, reduce: Reduce
) -> Tensor:
    """Forward every (example, step) perturbation and reduce each output to one value per row.

    Args:
        counts: ``(B, S)`` how many top-ranked features each step selects.
        keep: ``(S,)`` bool, whether each step keeps (True) or perturbs (False) its selection.
        reduce: ``(output, example) -> (R,)`` for a chunk of ``R`` rows.

    Returns:
        ``(B, S)`` on the inputs' device.
    """
    batch, steps = counts.shape
    total = batch * steps
    chunk = setup.max_examples_per_batch or total
    starts = range(0, total, chunk)
    values = []
    with torch.no_grad():
        for start in _progress(starts, setup.show_progress, setup.description):
            row = torch.arange(start, min(start + chunk, total), device=setup.device)
            example, step = row // steps, row % steps
            rows = PerturbedRows(example, counts[example, step], keep[step])
            perturbed = ranking.perturb(setup.inputs, setup.baselines, rows)
            extra = _rows_of_args(setup.additional_forward_args, example, batch)
            values.append(reduce(setup.forward_func(*perturbed, *extra), example))
    return torch.cat(values).to(setup.device).view(batch, steps)


def _progress(starts: range, show: bool | None, description: str) -> Iterable[int]:
    if show is None:
        show = len(starts) > 1 and sys.stderr.isatty()
    if not show:
        return starts
    from tqdm.auto import tqdm

    return tqdm(starts, desc=description, unit="forward")


def resolve_target(
    setup: ForwardSetup, ranking: FeatureRanking, target: TargetType, score: str
) -> Tensor | None:
    """The target as a ``(B, k)`` LongTensor of indices, or None for "the output itself".

    ``target=None`` reads one unperturbed forward: an output with one value per example is the
    score itself (``score='logit'`` only); a ``(B, C)`` output gives its argmax class.
    """
    if target is not None:
        return target_indices(target, setup.batch, setup.device)
    single = []

    def predicted_class(output: Any, example: Tensor) -> Tensor:
        _check_output(output, len(example))
        if output[0].numel() == 1:
            single.append(True)
            return torch.zeros(len(example), dtype=torch.long, device=output.device)
        if output.dim() != 2:
            raise ValueError(
                f"target=None needs an output of shape (B,) or (B, C), got {tuple(output.shape)}; "
                "pass a tuple target such as target=(token, class), or a list of tuples."
            )
        return output.argmax(-1)

    counts = torch.zeros(setup.batch, 1, dtype=torch.long, device=setup.device)
    keep = torch.zeros(1, dtype=torch.bool, device=setup.device)
    classes = run_perturbed(setup, ranking, counts, keep, predicted_class)
    if not single:
        return classes
    if score != "logit":
        raise ValueError(
            f"forward_func returns one value per example, so score={score!r} has no classes to "
            "normalise over; use score='logit' to read the output as is, or return (B, C) logits."
        )
    return None


def target_indices(target: TargetType, batch: int, device: torch.device) -> Tensor:
    """Captum's target forms as a ``(B, k)`` LongTensor (k indices after the batch dimension)."""
    if isinstance(target, bool):
        raise TypeError("target must be an int, a tuple of ints, a tensor or a list, not a bool.")
    if isinstance(target, (int, tuple)):  # made on the device: nothing to upload
        values = (target,) if isinstance(target, int) else _int_tuple(target)
        index = torch.empty(batch, len(values), dtype=torch.long, device=device)
        for column, value in enumerate(values):
            index[:, column].fill_(value)  # a kernel argument, not a copy from the host
        return index
    if isinstance(target, Tensor):
        index = _tensor_target(target, batch)
    elif isinstance(target, list):
        index = _list_target(target, batch)
    else:
        raise TypeError(f"target of type {type(target).__name__} is not a Captum target.")
    return index.to(device=device, dtype=torch.long).expand(batch, -1)


def _int_tuple(target: Sequence[Any]) -> tuple[int, ...]:
    if not target or not all(isinstance(t, int) and not isinstance(t, bool) for t in target):
        raise TypeError(f"A tuple target must hold ints, got {target!r}.")
    return tuple(target)


def _tensor_target(target: Tensor, batch: int) -> Tensor:
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"A tensor target must hold integer indices, got {target.dtype}.")
    if target.numel() == 1:
        return target.reshape(1, 1)
    if target.dim() == 1 and target.numel() == batch:
        return target.reshape(batch, 1)
    raise ValueError(
        f"A tensor target must be a scalar or hold one index per example ({batch},), "
        f"got shape {tuple(target.shape)}."
    )


def _list_target(target: list[Any], batch: int) -> Tensor:
    if len(target) != batch:
        raise ValueError(f"target list has {len(target)} entries for {batch} examples.")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in target):
        return torch.tensor(target).reshape(batch, 1)
    if all(isinstance(t, tuple) for t in target):
        rows = [_int_tuple(t) for t in target]
        if len({len(r) for r in rows}) == 1:
            return torch.tensor(rows)
    raise TypeError("A list target must hold ints, or tuples of ints of the same length.")


def select_scores(output: Any, index: Tensor | None, score: str, rows: int) -> Tensor:
    """``(R,)`` the target's score in each row of ``output``.

    ``prob`` is the softmax over the last dimension, ``logit`` the raw output, and ``correct``
    is 1.0 where the last dimension's argmax is the target class.
    """
    _check_output(output, rows)
    if index is None:
        return output.reshape(rows)
    if output.dim() - 1 != index.shape[1]:
        raise ValueError(
            f"target gives {index.shape[1]} index(es) per example but the output has shape "
            f"{tuple(output.shape)}; pass one index per non-batch dimension, e.g. "
            "target=(token, class) for a (B, T, C) output."
        )
    if score != "logit" and output.shape[-1] < 2:
        raise ValueError(
            f"score={score!r} needs class scores over the last dimension, got an output of shape "
            f"{tuple(output.shape)}; use score='logit'."
        )
    values = _transform(output, score)
    index = index.to(output.device)
    return values[(torch.arange(rows, device=output.device), *index.unbind(1))]


def _transform(output: Tensor, score: str) -> Tensor:
    if score == "prob":
        return output.float().softmax(-1) if not output.is_floating_point() else output.softmax(-1)
    if score == "correct":
        one_hot = F.one_hot(output.argmax(-1), output.shape[-1])
        return one_hot.to(output.dtype if output.is_floating_point() else torch.float32)
    return output


def _check_output(output: Any, rows: int) -> None:
    if not isinstance(output, Tensor):
        raise TypeError(f"forward_func must return a tensor, got {type(output).__name__}.")
    if output.dim() == 0 or output.shape[0] != rows:
        raise ValueError(
            f"forward_func returned shape {tuple(output.shape)} for {rows} examples; it must "
            "return one row per example, batch dimension first."
        )
