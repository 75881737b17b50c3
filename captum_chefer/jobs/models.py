"""Models the command line can build by name, and the ``module:function`` builder protocol."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

#: The class descriptions of the ready MiniLM classifier (label 0, label 1).
SENTIMENT_PROMPTS = ("This is terrible and disappointing.", "This is wonderful and delightful.")
#: Their names (labels in the data may be written as these).
SENTIMENT_CLASSES = ("negative", "positive")


@dataclass
class JobModel:
    """What a builder returns for a job: the model and what it needs.

    Attributes:
        model: returns ``(B, C)`` logits.
        tokenizer: for text data, or None.
        method_defaults: options our attention methods need for this model (e.g.
            ``{"token_index": "mean"}`` for a mean-pooled model).
        name: recorded in the job's index.
        class_names: the classes' names in class-id order (labels in the data may be written
            as these names; the report names the classes), or None.

    Example:
        >>> from torch import nn
        >>> JobModel(nn.Linear(4, 2), class_names=("no", "yes")).class_names
        ('no', 'yes')
    """

    model: nn.Module
    tokenizer: Any = None
    method_defaults: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    class_names: Sequence[str] | None = None


class PrototypeClassifier(nn.Module):
    """Zero-shot classes from a sentence encoder: the cosine similarity (x ``scale``) of the
    text's mean-pooled embedding with each class description's embedding.

    Args:
        encoder: a Hugging Face encoder (``last_hidden_state``).
        prototypes: ``(C, D)`` the class descriptions' embeddings.
        scale: multiplies the cosines (a temperature for the softmax).
    """

    def __init__(self, encoder: nn.Module, prototypes: Tensor, scale: float = 20.0) -> None:
        super().__init__()
        self.encoder, self.scale = encoder, scale
        self.prototypes: Tensor
        self.register_buffer("prototypes", nn.functional.normalize(prototypes, dim=-1))

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(B, D)`` mask-aware mean of the last hidden states, L2-normalised."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return nn.functional.normalize(pooled, dim=-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.scale * self.embed(input_ids, attention_mask) @ self.prototypes.T


def minilm_sentiment(
    prompts: Sequence[str] = SENTIMENT_PROMPTS, class_names: Sequence[str] | None = None
) -> JobModel:
    """The shipped all-MiniLM-L6-v2 as a zero-shot classifier over ``prompts`` (one per class).

    Relevance is read with ``token_index="mean"``, since the embedding is a mean over tokens.

    Args:
        prompts: one description per class, in class-id order.
        class_names: the classes' names (default: ``negative``, ``positive`` for the default
            prompts, else none).
    """
    if class_names is None and tuple(prompts) == SENTIMENT_PROMPTS:
        class_names = SENTIMENT_CLASSES
    from ..pretrained import load_minilm

    encoder, tokenizer = load_minilm()
    config: Any = encoder.config
    width = int(config.hidden_size)
    classifier = PrototypeClassifier(encoder, torch.zeros(len(prompts), width))
    encoded = tokenizer(list(prompts), padding=True, return_tensors="pt")
    with torch.no_grad():
        classifier.prototypes.copy_(
            classifier.embed(encoded["input_ids"], encoded["attention_mask"])
        )
    return JobModel(
        classifier.eval(),
        tokenizer,
        {"token_index": "mean"},
        "all-MiniLM-L6-v2 zero-shot sentiment",
        class_names,
    )


READY = {"minilm": minilm_sentiment}
"""Models built by name on the command line."""


def build_model(spec: str) -> JobModel:
    """A :class:`JobModel` from a ready name (``"minilm"``) or ``"module:function"``.

    The function takes no arguments and returns a :class:`JobModel`, a model, or
    ``(model, tokenizer)``.

    Raises:
        ValueError: for a spec that is neither, naming both forms.
    """
    if spec in READY:
        return READY[spec]()
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(
            f"--model {spec!r}: give a ready model ({', '.join(READY)}) or 'module:function' "
            "naming a function that builds the model, e.g. 'my_project.models:build'."
        )
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--model {spec!r}: cannot import it ({error}).") from error
    return as_job_model(function(), spec)


def as_job_model(built: Any, name: str) -> JobModel:
    """Normalise what a builder returned."""
    if isinstance(built, JobModel):
        return built
    if isinstance(built, nn.Module):
        return JobModel(built, name=name)
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module):
        return JobModel(built[0], built[1], name=name)
    raise TypeError(
        f"{name} returned {type(built).__name__}; return a JobModel, an nn.Module, or "
        "(model, tokenizer)."
    )
