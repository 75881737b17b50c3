"""The attribution methods of a job: ours and Captum's, by name or as objects.

Each :class:`Method` is bound to the model into an explainer that maps a :class:`Batch` and its
targets to one relevance per feature: ``(B, T)`` per token for text, ``(B, 1, H, W)`` per pixel
for images. Captum's input-level methods cannot take token ids, so for text their layer
variant runs on the model's input embeddings (``IntegratedGradients`` becomes
``LayerIntegratedGradients``), summed over the hidden dimension.
"""

from __future__ import annotations

import importlib
import inspect
import json
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .data import Batch

#: Captum input methods → their variant on the embedding layer, for token ids.
TEXT_LAYER_VARIANTS = {
    "IntegratedGradients": "LayerIntegratedGradients",
    "InputXGradient": "LayerGradientXActivation",
    "DeepLift": "LayerDeepLift",
    "GradientShap": "LayerGradientShap",
}

Explainer = Callable[[Batch, Tensor], Tensor]


@dataclass(frozen=True)
class Method:
    """One attribution method of a job.

    Attributes:
        attribution: a class name (``"CheferRelevance"``, ``"AttentionRollout"``,
            ``"IntegratedGradients"``), an attribution class, or a callable
            ``(inputs, target, additional_forward_args) -> Tensor``.
        options: keyword arguments for ``attribute`` (e.g. ``{"n_steps": 16}``).
        name: the label in the results and the report (default: the class name).

    Example:
        >>> Method("IntegratedGradients", {"n_steps": 8}).label
        'IntegratedGradients'
        >>> Method("CheferRelevance", name="Chefer").describe()["attribution"]
        'captum_chefer.CheferRelevance'
    """

    attribution: str | type | Callable[..., Tensor]
    options: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None

    @property
    def label(self) -> str:
        """The method's name in the results."""
        if self.name is not None:
            return self.name
        if isinstance(self.attribution, str):
            return self.attribution
        return getattr(self.attribution, "__name__", type(self.attribution).__name__)

    def describe(self) -> dict[str, Any]:
        """JSON-safe record of the method and its options (for the job's index)."""
        return {
            "name": self.label,
            "attribution": _qualified(self.attribution),
            "options": json.loads(json.dumps(dict(self.options), default=repr, sort_keys=True)),
        }


def as_method(value: Method | str | type | Callable[..., Tensor]) -> Method:
    """A :class:`Method` from a method, a name, a class or a callable."""
    return value if isinstance(value, Method) else Method(value)


def check_labels(methods: list[Method]) -> None:
    """Raise when two methods share a label (their results would overwrite each other)."""
    labels = [m.label for m in methods]
    if not methods:
        raise ValueError("A job needs at least one method, e.g. methods=['CheferRelevance'].")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"Methods {duplicates} appear twice; give each a distinct name=.")
    bad = [label for label in labels if "/" in label]
    if bad:
        raise ValueError(f"Method names may not contain '/': {bad}.")


def bind(
    method: Method,
    model: nn.Module,
    kind: str,
    defaults: Mapping[str, Any],
    pad_id: int = 0,
) -> Explainer:
    """An explainer ``(batch, target) -> relevance`` for ``method`` on ``model``.

    Args:
        method: the method.
        model: the model, returning ``(B, C)`` logits (or an output with ``.logits``).
        kind: ``"text"`` or ``"image"``.
        defaults: options for our attention methods that the model needs (e.g.
            ``{"token_index": "mean"}`` for a mean-pooled model); the method's own options win.
            With ``"mean"``, the baselines read ``self_relevance="keep"`` unless told.
        pad_id: the padding id, the default reference of Captum's methods on token ids.

    Raises:
        ValueError: for an unknown name, listing where it looked.
    """
    attribution: Any = method.attribution
    if isinstance(attribution, str):
        attribution = _resolve(attribution, kind)
    if _is_ours(attribution):
        options = _our_options(attribution, defaults, method.options)
        check_options(method.label, attribution.attribute, options, JOB_SETS | {"output"})
        return _ours(attribution(model), kind, options)
    if inspect.isclass(attribution):
        return _captum(attribution, model, kind, method, pad_id)
    if callable(attribution):
        check_options(method.label, attribution, method.options, JOB_SETS, positional=3)
        return _callable(attribution, kind, dict(method.options))
    raise TypeError(f"A method must be a name, a class or a callable, got {attribution!r}.")


#: The arguments the job passes itself, per batch.
JOB_SETS = frozenset({"inputs", "target", "additional_forward_args"})


def check_names(methods: list[Method]) -> None:
    """Raise for a method name that is neither ours nor Captum's (before anything is built).

    Example:
        >>> check_names([Method("CheferRelevanse")])
        Traceback (most recent call last):
        ...
        ValueError: Unknown method 'CheferRelevanse': ... Did you mean 'CheferRelevance'? ...
    """
    for method in methods:
        if isinstance(method.attribution, str):
            _known(method.attribution)


def _known(name: str) -> None:
    import difflib

    ours, captum = _our_names(), dir(importlib.import_module("captum.attr"))
    if name in ours or (name in captum and name[:1].isupper()):
        return
    close = difflib.get_close_matches(name, ours + [n for n in captum if n[:1].isupper()], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"Unknown method {name!r}: not in captum_chefer.attr ({', '.join(ours)}) nor in "
        f"captum.attr.{hint} Check the spelling, or pass the class or a callable."
    )


def check_options(
    label: str,
    function: Callable[..., Any],
    options: Mapping[str, Any],
    job_sets: Collection[str],
    positional: int = 0,
) -> None:
    """Raise when an option is one the job sets, is no parameter of ``function``, or has a
    type or value its annotation rules out (checked where the annotation is plain: ``int``,
    ``float``, ``bool``, ``str``, ``None``, a ``Literal``, or a union of these).

    Args:
        label: the method's name, for the message.
        function: its ``attribute`` method (or the callable).
        options: the keyword options.
        job_sets: the arguments the job passes itself.
        positional: leading parameters the job passes by position (callables).

    Example:
        >>> from captum.attr import IntegratedGradients
        >>> check_options("IG", IntegratedGradients.attribute, {"n_steps": "abc"}, JOB_SETS)
        Traceback (most recent call last):
        ...
        ValueError: IG: option n_steps='abc' must be an int (its default is 50); write it ...
    """
    try:
        parameters = dict(inspect.signature(function).parameters)
    except (TypeError, ValueError):  # no signature to check against
        return
    taken = set(list(parameters)[1 if "self" in parameters else 0 :][:positional])
    any_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    hints = _hints(function)
    for key, value in options.items():
        if key in job_sets or key in taken:
            raise ValueError(f"{label}: the job passes {key!r} itself; remove it from the options.")
        if key not in parameters:
            if any_keyword:
                continue
            accepted = [n for n in parameters if n != "self" and n not in {*job_sets, *taken}]
            raise ValueError(
                f"{label} has no option {key!r}; its options are {accepted}. Check the spelling."
            )
        _check_value(label, key, value, hints.get(key), parameters[key].default)


def _hints(function: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(function)
    except Exception:  # unresolvable annotations: nothing is checked
        return {}


def _check_value(label: str, key: str, value: Any, hint: Any, default: Any) -> None:
    allowed = _plain(hint)
    if allowed is None or _fits(value, allowed):
        return
    kinds = " or ".join(
        repr(a) if not isinstance(a, type) else _TYPE_NAMES.get(a, a.__name__) for a in allowed
    )
    shown = "" if default is inspect.Parameter.empty else f" (its default is {default!r})"
    raise ValueError(
        f"{label}: option {key}={value!r} must be {kinds}{shown}; write it as a Python literal, "
        f"e.g. {key}={default!r}."
    )


_TYPE_NAMES = {int: "an int", float: "a number", bool: "True or False", str: "a string"}


def _plain(hint: Any) -> list[Any] | None:
    """The types and literal values a plain annotation allows, or None (not checked)."""
    if hint is None or hint is type(None):
        return [type(None)]
    if hint in (int, float, bool, str):
        return [hint]
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return list(typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        parts = [_plain(arg) for arg in typing.get_args(hint)]
        return None if any(p is None for p in parts) else [a for p in parts for a in p]  # type: ignore[union-attr]
    return None


def _fits(value: Any, allowed: list[Any]) -> bool:
    return any(_fits_one(value, kind) for kind in allowed)


def _fits_one(value: Any, kind: Any) -> bool:
    if not isinstance(kind, type):  # a Literal's value
        return type(value) is type(kind) and value == kind
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _resolve(name: str, kind: str) -> type:
    ours = importlib.import_module("captum_chefer.attr")
    if name in ours.__all__ and name != "AttentionAttribution":
        return getattr(ours, name)
    captum = importlib.import_module("captum.attr")
    if not hasattr(captum, name):
        raise ValueError(
            f"Unknown method {name!r}: not in captum_chefer.attr ({', '.join(_our_names())}) nor "
            "in captum.attr. Check the spelling, or pass the class or a callable."
        )
    if kind == "text" and not name.startswith("Layer"):
        if name not in TEXT_LAYER_VARIANTS:
            raise ValueError(
                f"{name!r} cannot attribute token ids; for text use one of "
                f"{sorted(TEXT_LAYER_VARIANTS)} (run on the input embeddings), a Layer* method "
                "of captum.attr, or one of ours."
            )
        name = TEXT_LAYER_VARIANTS[name]
    return getattr(captum, name)


def _our_names() -> list[str]:
    ours = importlib.import_module("captum_chefer.attr")
    return [name for name in ours.__all__ if name not in ("AttentionAttribution", "StreamMap")]


def _is_ours(attribution: Any) -> bool:
    base = importlib.import_module("captum_chefer.attr").AttentionAttribution
    return inspect.isclass(attribution) and issubclass(attribution, base)


def _our_options(
    cls: type, defaults: Mapping[str, Any], options: Mapping[str, Any]
) -> dict[str, Any]:
    """The defaults, then the method's options. With ``token_index="mean"`` every real token is
    read, so a method whose ``self_relevance`` defaults to ``"zero"`` (the baselines) would
    return zeros: it gets ``"keep"`` instead unless the options say otherwise."""
    merged = {**defaults, **options}
    default = inspect.signature(cls.attribute).parameters.get("self_relevance")  # type: ignore[attr-defined]
    zeroes = default is not None and default.default == "zero"
    if merged.get("token_index") == "mean" and zeroes and "self_relevance" not in merged:
        merged["self_relevance"] = "keep"
    return merged


def _ours(instance: Any, kind: str, options: dict[str, Any]) -> Explainer:
    def explain(batch: Batch, target: Tensor) -> Tensor:
        if kind == "text":
            relevance = instance.attribute(
                batch.inputs, target, (batch.attention_mask,), output="token", **options
            )
            return relevance[:, : batch.inputs.shape[1]]
        return instance.attribute(batch.inputs, target, **options).mean(1, keepdim=True)

    return explain


class LogitsOf(nn.Module):
    """``model`` whose output is reduced to its logits tensor (Captum and the metrics need one)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> Tensor:
        return logits_of(self.model(*args))


def logits_of(output: Any) -> Tensor:
    """The ``(B, C)`` tensor of a model output: itself, ``.logits``, or its first element."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"The model returned {type(output).__name__}; it must return logits (B, C).")


def _captum(cls: type, model: nn.Module, kind: str, method: Method, pad_id: int) -> Explainer:
    wrapped = LogitsOf(model)
    layer_method = cls.__name__.startswith("Layer")
    instance = cls(wrapped, input_embeddings(model)) if layer_method else cls(wrapped)
    options = dict(method.options)
    check_options(method.label, instance.attribute, options, JOB_SETS)
    takes_baselines = "baselines" in inspect.signature(instance.attribute).parameters

    def explain(batch: Batch, target: Tensor) -> Tensor:
        extra: dict[str, Any] = {}
        if kind == "text":
            extra["additional_forward_args"] = (batch.attention_mask,)
        if kind == "text" and takes_baselines and "baselines" not in options:
            extra["baselines"] = reference_ids(batch, pad_id)
        inputs = batch.inputs
        if inputs.is_floating_point():  # Captum would flip requires_grad on the data itself
            inputs = inputs.detach().clone().requires_grad_()
        relevance = instance.attribute(inputs, target=target, **extra, **options)
        if kind == "text":
            return relevance.sum(-1) if relevance.dim() == 3 else relevance
        return relevance.sum(1, keepdim=True)

    return explain


def reference_ids(batch: Batch, pad_id: int) -> Tensor:
    """Integrated Gradients' reference for token ids: real, non-special tokens become
    ``pad_id``; [CLS]/[SEP] and padding stay."""
    assert batch.attention_mask is not None and batch.special is not None
    keep = batch.special | (batch.attention_mask == 0)
    return torch.where(keep, batch.inputs, torch.full_like(batch.inputs, pad_id))


def input_embeddings(model: nn.Module) -> nn.Module:
    """The model's token embedding layer: ``get_input_embeddings()`` or its first ``nn.Embedding``.

    Raises:
        ValueError: when the model has none.
    """
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter) and isinstance(getter(), nn.Module):
        return getter()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module
    raise ValueError(
        "Captum's layer methods need the model's token embedding layer, but it has no "
        "nn.Embedding nor get_input_embeddings(); pass a Method with a callable instead."
    )


def _callable(function: Callable[..., Tensor], kind: str, options: dict[str, Any]) -> Explainer:
    def explain(batch: Batch, target: Tensor) -> Tensor:
        extra = None if kind == "image" else (batch.attention_mask,)
        relevance = function(batch.inputs, target, extra, **options)
        if not isinstance(relevance, Tensor):
            raise TypeError(
                f"A method callable must return a tensor, got {type(relevance).__name__}."
            )
        if kind == "text":
            return relevance.sum(-1) if relevance.dim() == 3 else relevance
        return relevance.sum(1, keepdim=True) if relevance.shape[1] != 1 else relevance

    return explain


def _qualified(value: Any) -> str:
    if isinstance(value, str):
        return value if "." in value else f"{_home(value)}.{value}"
    return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"


def _home(name: str) -> str:
    ours = importlib.import_module("captum_chefer.attr")
    return "captum_chefer" if name in ours.__all__ else "captum.attr"
