"""One shard's computation: per batch, the model's class, each method's relevance, the scores.

A batch is computed the same way on any rank and in any run: the same examples, the same
padding, the same seed per (batch, method), so its results depend on nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .data import Batch, BatchSource
from .methods import Explainer, LogitsOf
from .scores import batch_scores


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU when it has none)."""
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def compute_shard(
    model: nn.Module,
    source: BatchSource,
    explainers: Mapping[str, Explainer],
    batches: Collection[int],
    options: Mapping[str, Any],
    on_batch: Callable[[int], None],
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """One shard's tensors and its record (examples, seconds per method, start and end).

    Args:
        model: returns ``(B, C)`` logits.
        source: the data.
        explainers: ``{label: explainer}``.
        batches: the shard's batch indices.
        options: ``seed``, ``target`` (``"predicted"`` or ``"label"``) and
            ``max_examples_per_batch``.
        on_batch: called with each batch's number of examples once it is done.
    """
    tensors: dict[str, list[Tensor]] = {}
    seconds = dict.fromkeys(explainers, 0.0)
    began, first, last = time.time(), None, None
    device = model_device(model)
    for index, batch in source.batches(batches):
        batch = batch.to(device)
        predicted, target = classes(logits_for(model, batch), batch, options["target"])
        _add(tensors, "examples", torch.arange(batch.start, batch.start + len(batch)))
        _add(tensors, "target", target.cpu())
        _add(tensors, "predicted", predicted.cpu())
        if batch.labels is not None:
            _add(tensors, "label", batch.labels.long().cpu())
        for position, (label, explain) in enumerate(explainers.items()):
            torch.manual_seed(batch_seed(options["seed"], index, position))
            started = time.perf_counter()
            relevance = explain(batch, target).detach().float()
            seconds[label] += time.perf_counter() - started
            check_relevance(label, relevance, batch)
            scores = batch_scores(
                LogitsOf(model),
                batch,
                relevance,
                target,
                source.baseline,
                options["max_examples_per_batch"],
            )
            _store_batch(tensors, batch, label, relevance, scores)
        first = batch.start if first is None else first
        last = batch.start + len(batch)
        on_batch(len(batch))
    merged = {
        k: v[0] if k.startswith(("attr/", "input/")) else torch.cat(v) for k, v in tensors.items()
    }
    record = {"examples": [first, last], "seconds": seconds, "started": began}
    return merged, record | {"finished": time.time()}


def _add(tensors: dict[str, list[Tensor]], key: str, value: Tensor) -> None:
    tensors.setdefault(key, []).append(value)


def batch_seed(seed: int, batch: int, method: int) -> int:
    """The seed of one (batch, method) computation.

    Example:
        >>> batch_seed(0, 2, 1)
        2019
    """
    return (seed * 1_000_003 + batch * 1_009 + method) % (2**63)


def logits_for(model: nn.Module, batch: Batch) -> Tensor:
    """``(B, C)`` the model's logits on ``batch`` (no gradient).

    Raises:
        ValueError: for a model that does not return ``(B, C)`` float logits.
    """
    with torch.no_grad():
        logits = LogitsOf(model)(*forward_args(batch))
    if logits.dim() != 2 or len(logits) != len(batch) or not logits.is_floating_point():
        raise ValueError(
            f"The model returned {tuple(logits.shape)} {logits.dtype} for {len(batch)} "
            "example(s); a job needs (B, C) float logits, one row of class scores per example."
        )
    return logits


def classes(logits: Tensor, batch: Batch, target: str) -> tuple[Tensor, Tensor]:
    """``(B,)`` the model's predicted classes and ``(B,)`` the classes to explain.

    Raises:
        ValueError: for labels that are no class of the model, or ``target="label"`` without
            labels.
    """
    predicted = logits.argmax(-1)
    if batch.labels is not None:
        check_label_range(batch.labels, logits.shape[-1], batch.start)
    if target == "predicted":
        return predicted, predicted
    if batch.labels is None:
        raise ValueError(
            "target='label' needs labels in the data; add a label column, or explain the "
            "predicted class (--target predicted, target='predicted')."
        )
    return predicted, batch.labels.long()


def check_label_range(labels: Tensor, num_classes: int, start: int = 0) -> None:
    """Raise when a label is no class of a ``num_classes``-class model, naming the example.

    Example:
        >>> check_label_range(torch.tensor([0, 2]), 2, start=10)
        Traceback (most recent call last):
        ...
        ValueError: Example 11 has label 2, but the model has 2 classes (0-1); ...
    """
    outside = ((labels < 0) | (labels >= num_classes)).nonzero().flatten().tolist()
    if outside:
        row = outside[0]
        raise ValueError(
            f"Example {start + row} has label {int(labels[row])}, but the model has "
            f"{num_classes} classes (0-{num_classes - 1}); labels must be the model's class ids."
        )


def forward_args(batch: Batch) -> tuple[Tensor | None, ...]:
    """The model's arguments: ``(images,)`` or ``(ids, attention_mask)``."""
    return (batch.inputs,) if batch.kind == "image" else (batch.inputs, batch.attention_mask)


def check_relevance(label: str, relevance: Tensor, batch: Batch) -> None:
    """Raise unless ``relevance`` is finite, one value per token or per pixel."""
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
    tensors: dict[str, list[Tensor]],
    batch: Batch,
    label: str,
    relevance: Tensor,
    scores: tuple[dict[str, Tensor], dict[str, Tensor]],
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
    values, curves = scores
    for name, value in values.items():
        _add(tensors, f"score/{label}/{name}", value.cpu())
    for name, value in curves.items():
        _add(tensors, f"curve/{label}/{name}", value.cpu())
