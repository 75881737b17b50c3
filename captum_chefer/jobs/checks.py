"""Checks run before a job writes anything: the model, every method and the metrics are tried
on the dataset's first example, and the labels checked against the model's classes.

A mistake found here (a misspelt option, an option of the wrong type, a method the model needs
told something for) stops the job while its output folder is still as it was, so the corrected
command runs in the same folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .compute import check_label_range, check_relevance, classes, logits_for, model_device
from .data import BatchSource
from .methods import Explainer, LogitsOf
from .scores import batch_scores


class MethodFailed(ValueError):
    """A method failed on the dataset's first example, before anything was written."""


def rehearse(
    model: nn.Module,
    source: BatchSource,
    explainers: Mapping[str, Explainer],
    options: Mapping[str, Any],
) -> int:
    """Run the model, each method and the metrics on the first example; the number of classes.

    Args:
        model: returns ``(B, C)`` logits.
        source: the data.
        explainers: ``{label: explainer}``.
        options: ``seed``, ``target`` and ``max_examples_per_batch`` (see ``JobSettings``).

    Raises:
        ValueError: naming the method and its error, or the model's output, or a label.
    """
    _, batch = next(iter(source.batches({0})))
    one = batch.take(1).to(model_device(model))
    try:
        logits = logits_for(model, one)
    except ValueError:
        raise
    except Exception as error:
        raise ValueError(
            f"The model failed on example {one.start}, tried before anything is written: "
            f"{type(error).__name__}: {error}. It is called as model(ids, attention_mask) for "
            "text, model(images) for images."
        ) from error
    _, target = classes(logits, one, options["target"])
    num_classes = logits.shape[-1]
    labels = _all_labels(source)
    if labels is not None:
        check_label_range(labels, num_classes)
    for label, explain in explainers.items():
        try:
            torch.manual_seed(options["seed"])
            relevance = explain(one, target).detach().float()
            check_relevance(label, relevance, one)
            batch_scores(
                LogitsOf(model),
                one,
                relevance,
                target,
                source.baseline,
                options["max_examples_per_batch"],
            )
        except Exception as error:
            raise MethodFailed(
                f"{label} failed on example {one.start}, tried before anything is written: "
                f"{type(error).__name__}: {error}"
            ) from error
    return num_classes


def _all_labels(source: BatchSource) -> Tensor | None:
    """Every label, when the source holds them (files, texts, tensors); else None, and each
    batch's labels are checked as it is computed."""
    labels = getattr(source, "labels", None)  # optional: a DataLoader's are read per batch
    return None if labels is None else torch.as_tensor(labels)
