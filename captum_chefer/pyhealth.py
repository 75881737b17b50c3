"""PyHealth's interpreter API over this package's attributions: drop-ins for ``pyhealth.interpret``.

PyHealth (2.1.0) calls an interpreter as ``interpreter.attribute(**batch)`` (its ``Evaluator``
and its ensembles do) and expects ``{feature_key: tensor shaped like that feature's values}``.
:class:`Interpreter` gives any attribution class of this package that shape; swapping one import
is enough::

    from captum_chefer.pyhealth import CheferRelevance  # was: from pyhealth.interpret.methods

The adapter converts and does nothing else; it knows PyHealth's batch format, not its models:

- **Batch → inputs.** The value tensor of each of ``model.feature_keys`` is one input, in that
  order (the ``"value"`` part of a tuple feature, as the feature's processor ``schema()`` names
  it); the rest of the batch (times, masks, labels, ids) is passed to the model unchanged.
- **Output.** The model's ``"logit"``; a model that returns none (``TorchvisionModel``) is read
  where it turns its logits into ``"y_prob"``: the input of the sigmoid or softmax whose output
  it returns (BaseModel's ``prepare_y_prob``).
- **Target.** PyHealth's convention: a single-logit output (binary, regression) is explained as
  it is, whatever ``target_class_idx`` says; several logits (multiclass, multilabel) at
  ``target_class_idx``, else at each example's largest logit.
- **Maps → dict.** What is read, which rows and which layers explain which input is decided by
  the attribution class from the computation (one map per input where each feature has its
  own transformer, as in PyHealth's ``Transformer``). Relevance per token (Chefer, rollout) is
  laid on the feature's values by :func:`spread_over_values`: a visit's relevance goes to each
  code slot of that visit. Relevance per value (AttnLRP, CP-LRP) is returned as it is, one value
  per code.

Unlike PyHealth's interpreters, the constructor does not call ``model.eval()``: the model is
left exactly as it was. In training mode, dropout makes maps random (the attribution warns);
call ``model.eval()`` first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import attr
from .core.mapping import tokens_to_input

_PROBABILITIES = {
    F.softmax,
    torch.softmax,
    Tensor.softmax,
    torch.special.softmax,
    torch.sigmoid,
    Tensor.sigmoid,
    F.sigmoid,
    torch.special.expit,
}

CHEFER_DEFAULTS: dict[str, Any] = {"self_relevance": "keep"}
"""Options of :class:`CheferRelevance` and :class:`AttentionRollout` that make their maps
PyHealth's: the raw row of the read token, its identity share kept (PyHealth's ``R[:, 0]``)."""


class Interpreter:
    """A PyHealth interpreter (``BaseInterpreter``'s API) running an attribution of this package.

    Chefer et al. (ICCV 2021) by default, through :class:`captum_chefer.CheferRelevance`; any
    other class of the package (``AttnLRP``, ``CPLRP``, ``AttentionRollout``, …) with
    ``method=``. See the module for how a batch becomes inputs and the maps a dict.

    Args:
        model: a PyHealth model (``feature_keys``, ``dataset.input_processors``; its forward
            takes the batch as keywords and returns a dict with ``"logit"`` or ``"y_prob"``).
            It is not switched to eval mode.
        method: an attribution class of this package, called as ``method(forward_func, model)``.
        **options: keyword options of ``method.attribute`` (``self_relevance``, ``epsilon``, …);
            ``output`` is the interpreter's to set.

    Example:
        >>> import logging
        >>> from pyhealth.datasets import create_sample_dataset, get_dataloader
        >>> from pyhealth.models import Transformer
        >>> import captum_chefer
        >>> samples = [
        ...     {"patient_id": "p0", "conditions": ["A", "B", "C"], "label": 1},
        ...     {"patient_id": "p1", "conditions": ["D"], "label": 0},
        ... ]
        >>> logging.getLogger("pyhealth").setLevel(logging.WARNING)  # its info goes to stdout
        >>> dataset = create_sample_dataset(
        ...     samples, {"conditions": "sequence"}, {"label": "binary"}
        ... )
        >>> model = Transformer(dataset, embedding_dim=16, heads=2, num_layers=2).eval()
        >>> batch = next(iter(get_dataloader(dataset, batch_size=2)))
        >>> maps = Interpreter(model, captum_chefer.AttnLRP, epsilon=0.0)(**batch)
        >>> maps["conditions"].shape  # one value per code, 0 at padding
        torch.Size([2, 3])
        >>> bool((maps["conditions"][1, 1:] == 0).all())
        True
    """

    def __init__(
        self, model: nn.Module, method: type[attr.base.ModelAttribution] | None = None, **options
    ) -> None:
        if "output" in options:
            raise ValueError(
                "output is set by the interpreter (the maps are shaped like each feature's "
                "values); drop output= from the options."
            )
        self.model = model
        self.method = method if method is not None else attr.CheferRelevance
        if not (
            isinstance(self.method, type) and issubclass(self.method, attr.base.ModelAttribution)
        ):
            raise TypeError(
                f"method must be an attribution class of captum_chefer (CheferRelevance, AttnLRP, "
                f"CPLRP, AttentionRollout, …), not {self.method!r}."
            )
        self.options = options
        _register_as_pyhealth_interpreter(type(self))

    def attribute(
        self, target_class_idx: int | Tensor | None = None, **data: Any
    ) -> dict[str, Tensor]:
        """Relevance of each feature's values for the explained logit, keyed by feature.

        Args:
            target_class_idx: the class explained (multiclass, multilabel): an int, or a
                LongTensor ``(B,)``; None explains each example's largest logit. A single-logit
                model (binary, regression) has one output to explain, and ignores it.
            **data: a batch from PyHealth's ``get_dataloader``: the model's feature keys, and
                whatever else its forward takes (the label, ids, …).

        Returns:
            ``{feature_key: relevance}``, each shaped like that feature's value tensor (codes
            ``(B, T)``, nested codes ``(B, V, C)``, time series ``(B, T, F)``, images
            ``(B, C, H, W)``, …); exactly 0 on padded tokens.
        """
        keys = _feature_keys(self.model)
        slots = [_value_slot(self.model, key, data) for key in keys]
        values = tuple(slot.value(data[slot.key]) for slot in slots)
        forward = BatchForward(self.model, data, slots, target_class_idx)
        explainer = self.method(forward, self.model)
        reads_tokens = isinstance(explainer, attr.AttentionAttribution)
        options = {
            **self._defaults(),
            **self.options,
            "output": "token" if reads_tokens else "input",
        }
        with _pyhealth_fix(self.method):
            maps = explainer.attribute(values, **options)
        maps = _one_per_input(maps, keys)
        if reads_tokens:
            maps = tuple(
                spread_over_values(row, value, slot.image(value), **_mapping_options(options))
                for row, value, slot in zip(maps, values, slots)
            )
        return {key: _shaped_like(key, m, value) for key, m, value in zip(keys, maps, values)}

    def __call__(
        self, target_class_idx: int | Tensor | None = None, **data: Any
    ) -> dict[str, Tensor]:
        """The same as :meth:`attribute` (PyHealth's interpreters are callable)."""
        return self.attribute(target_class_idx, **data)

    def __repr__(self) -> str:
        model, method = type(self.model).__name__, self.method.__name__
        return f"{type(self).__name__}(model={model}, method={method})"

    def _defaults(self) -> dict[str, Any]:
        chefer_like = (attr.CheferRelevance, attr.AttentionRollout)
        return dict(CHEFER_DEFAULTS) if issubclass(self.method, chefer_like) else {}


class CheferRelevance(Interpreter):
    """Drop-in for ``pyhealth.interpret.methods.CheferRelevance``: Chefer et al. (ICCV 2021).

    Equal to PyHealth's map where PyHealth's is right (``Transformer``: the raw row ``R[:, 0]``,
    ``self_relevance="keep"``; pass ``self_relevance="subtract"`` to drop the read token's
    identity share), and also for ``TorchvisionModel``'s ViT. Models whose tokens are mixed
    outside attention (``StageAttentionNet``) are refused, naming :class:`AttnLRP`.

    Args:
        model: a PyHealth model.
        **options: options of :meth:`captum_chefer.CheferRelevance.attribute`.

    Example:
        >>> import logging
        >>> from pyhealth.datasets import create_sample_dataset, get_dataloader
        >>> from pyhealth.models import Transformer
        >>> samples = [
        ...     {"patient_id": "p0", "conditions": [["A", "B"], ["C"]], "label": 1},
        ...     {"patient_id": "p1", "conditions": [["D"]], "label": 0},
        ... ]
        >>> logging.getLogger("pyhealth").setLevel(logging.WARNING)  # its info goes to stdout
        >>> dataset = create_sample_dataset(
        ...     samples, {"conditions": "nested_sequence"}, {"label": "binary"}
        ... )
        >>> model = Transformer(dataset, embedding_dim=16, heads=2, num_layers=2).eval()
        >>> batch = next(iter(get_dataloader(dataset, batch_size=2)))
        >>> maps = CheferRelevance(model).attribute(**batch)
        >>> maps["conditions"].shape  # (patients, visits, codes): each code gets its visit's
        torch.Size([2, 2, 2])
        >>> bool((maps["conditions"][1, 1] == 0).all())  # the padded visit
        True
    """

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, attr.CheferRelevance, **options)


class AttentionRollout(Interpreter):
    """Drop-in for ``pyhealth.interpret.methods.AttentionRollout`` (Abnar & Zuidema, 2020).

    The read token's row of the product of ``rownorm(mean_h A + I)``, its own entry kept, as
    PyHealth's; other options of :meth:`captum_chefer.AttentionRollout.attribute` pass through.
    """

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, attr.AttentionRollout, **options)


class AttnLRP(Interpreter):
    """AttnLRP (Achtibat et al., ICML 2024) as a PyHealth interpreter: relevance per value.

    Codes get their embedding's relevance (so a nested sequence is explained code by code,
    padding exactly 0), continuous values gradient × input. Options (``epsilon``) are those of
    :meth:`captum_chefer.AttnLRP.attribute`.
    """

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, attr.AttnLRP, **options)


class CPLRP(Interpreter):
    """CP-LRP (Ali et al., ICML 2022) as a PyHealth interpreter: AttnLRP with the attention
    probabilities held constant; relevance per value, as :class:`AttnLRP`."""

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, attr.CPLRP, **options)


def spread_over_values(
    row: Tensor,
    value: Tensor,
    image: bool = False,
    num_prefix_tokens: int | None = None,
    patch_grid: tuple[int, int] | None = None,
) -> Tensor:
    """Lay relevance over tokens ``(B, N)`` on a feature's values ``(B, T, ...)``.

    - Tokens along the value's first axis (``N == T``: codes, visits, time steps): token ``t``'s
      relevance goes to every entry of ``value[:, t]``, so each code slot of a visit gets the
      visit's relevance (as PyHealth spreads it), the padded slots of a shorter visit included;
      a padded visit gets 0.
    - A feature the model makes one token of (``N == 1``: a vector, a multi-hot): every entry
      gets that token's relevance.
    - An image ``(B, C, H, W)`` (``image=True``, or 4-D with ``N != C``): the patch grid,
      upsampled bilinearly (:func:`captum_chefer.core.mapping.tokens_to_input`).

    Args:
        row: relevance per token ``(B, N)``.
        value: the feature's value tensor ``(B, T, ...)``.
        image: the value is an image (its processor says so).
        num_prefix_tokens: tokens before an image's patch grid; inferred when None.
        patch_grid: ``(rows, cols)`` of an image's patches; inferred when None.

    Returns:
        Relevance shaped like ``value``.

    Example:
        >>> row = torch.tensor([[0.5, 2.0, 0.0]])  # three visits, the last one padding
        >>> spread_over_values(row, torch.zeros(1, 3, 2, dtype=torch.long))
        tensor([[[0.5000, 0.5000],
                 [2.0000, 2.0000],
                 [0.0000, 0.0000]]])
    """
    batch, tokens = row.shape
    shape = value.shape
    if image or (value.dim() == 4 and shape[1] != tokens):
        return tokens_to_input(row, shape, num_prefix_tokens, patch_grid).to(value.device)
    if value.dim() >= 2 and shape[1] == tokens:
        spread = row.reshape(batch, tokens, *[1] * (value.dim() - 2))
    elif tokens == 1:
        spread = row.reshape(batch, *[1] * (value.dim() - 1))
    else:
        raise ValueError(
            f"Cannot lay relevance over {tokens} tokens on values of shape {tuple(shape)}: the "
            "model does not attend over this feature's first axis (did it truncate the "
            "sequence?). Explain it with AttnLRP, whose relevance is per value."
        )
    return spread.expand(shape).contiguous().to(value.device)


@dataclass(frozen=True)
class ValueSlot:
    """Where a feature's value tensor sits in the batch: the tensor itself, or one element of a
    tuple (``position``), as the feature's processor ``schema()`` names it."""

    key: str
    position: int | None
    processor: Any

    def value(self, feature: Any) -> Tensor:
        """The value tensor of ``feature``."""
        value = feature if self.position is None else feature[self.position]
        if not isinstance(value, Tensor):
            raise TypeError(
                f"Feature {self.key!r} holds {type(value).__name__}, not a tensor; pass a batch "
                "from pyhealth.datasets.get_dataloader."
            )
        return value

    def replace(self, feature: Any, value: Tensor) -> Any:
        """``feature`` with its value tensor replaced by ``value``."""
        if self.position is None:
            return value
        return (*feature[: self.position], value, *feature[self.position + 1 :])

    def image(self, value: Tensor) -> bool:
        """Whether the processor declares an image: channels, then height and width."""
        spatial = getattr(self.processor, "spatial", None)
        try:
            axes = tuple(spatial()) if callable(spatial) else ()
        except NotImplementedError:
            axes = ()
        return value.dim() == 4 and axes == (False, True, True)


class BatchForward:
    """The model as a function of its feature values: the batch with the values replaced, run
    through the model, the explained logit(s) returned.

    Args:
        model: a PyHealth model.
        data: the batch.
        slots: where each input sits in the batch, in the order of the inputs.
        target_class_idx: the class to keep (several logits only), or None for all of them.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Mapping[str, Any],
        slots: Sequence[ValueSlot],
        target_class_idx: int | Tensor | None,
    ) -> None:
        self.model = model
        self.data = dict(data)
        self.slots = list(slots)
        self.target_class_idx = target_class_idx

    def __call__(self, *values: Tensor) -> Tensor:
        batch = dict(self.data)
        for slot, value in zip(self.slots, values):
            batch[slot.key] = slot.replace(batch[slot.key], value)
        with _ProbabilitiesSeen() as seen:
            output = self.model(**batch)
        return explained_logits(_logits(output, seen), self.target_class_idx)


def explained_logits(logits: Tensor, target_class_idx: int | Tensor | None) -> Tensor:
    """PyHealth's target convention on logits ``(B, K)``: all of them when no class is given
    (the attribution then explains each example's largest), the one logit of a single-logit
    model whatever is given, else the given class's as ``(B, 1)``.

    Example:
        >>> logits = torch.tensor([[1.0, 3.0], [4.0, 2.0]])
        >>> explained_logits(logits, 0).flatten().tolist()
        [1.0, 4.0]
        >>> explained_logits(torch.tensor([[0.3]]), 1)  # binary: the one logit
        tensor([[0.3000]])
    """
    if target_class_idx is None or logits.dim() < 2 or logits.shape[-1] == 1:
        return logits
    index = torch.as_tensor(target_class_idx, device=logits.device).long()
    if index.dim() == 0:
        index = index.expand(logits.shape[0])
    if index.shape != (logits.shape[0],):
        raise ValueError(
            f"target_class_idx must be an int or one class per example ({logits.shape[0]}), not "
            f"a tensor of shape {tuple(index.shape)}."
        )
    return logits.gather(-1, index[:, None])


class _ProbabilitiesSeen(TorchFunctionMode):
    """Keeps the last softmax or sigmoid called on this thread: ``(its input, its output)``."""

    def __init__(self) -> None:
        super().__init__()
        self.last: tuple[Tensor, Tensor] | None = None

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        if func in _PROBABILITIES and args and isinstance(args[0], Tensor):
            self.last = (args[0], result)
        return result


def _logits(output: Any, seen: _ProbabilitiesSeen) -> Tensor:
    """The model's ``"logit"``, else the logits its ``"y_prob"`` was computed from."""
    if not isinstance(output, Mapping):
        raise TypeError(
            f"The model returned {type(output).__name__}; a PyHealth model returns a dict with "
            "'logit' or 'y_prob'."
        )
    if isinstance(output.get("logit"), Tensor):
        return output["logit"]
    probabilities = output.get("y_prob")
    if seen.last is not None and probabilities is not None and seen.last[1] is probabilities:
        return seen.last[0]
    raise ValueError(
        "The model's output has no 'logit', and its 'y_prob' is not the softmax or sigmoid of "
        "its logits computed last in its forward; return the logits as output['logit']."
    )


def _feature_keys(model: nn.Module) -> list[str]:
    keys = getattr(model, "feature_keys", None)
    if not keys:
        raise TypeError(
            f"{type(model).__name__} has no feature_keys; pass a PyHealth model (a "
            "pyhealth.models.BaseModel built on a dataset)."
        )
    return list(keys)


def _value_slot(model: nn.Module, key: str, data: Mapping[str, Any]) -> ValueSlot:
    if key not in data:
        raise KeyError(
            f"The batch has no feature {key!r} (it has {sorted(data)}); pass a batch of the "
            "model's dataset, e.g. next(iter(get_dataloader(dataset, batch_size=...)))."
        )
    processor = _processor(model, key)
    if isinstance(data[key], Tensor):
        return ValueSlot(key, None, processor)
    schema = tuple(processor.schema()) if processor is not None else ()
    if "value" not in schema:
        raise ValueError(
            f"Feature {key!r} is a tuple, and its processor's schema {schema} names no 'value'."
        )
    return ValueSlot(key, schema.index("value"), processor)


def _processor(model: nn.Module, key: str) -> Any:
    dataset = getattr(model, "dataset", None)
    processors = getattr(dataset, "input_processors", None) or {}
    return processors.get(key)


def _one_per_input(maps: Tensor | tuple[Tensor, ...], keys: Sequence[str]) -> tuple[Tensor, ...]:
    """One map per feature; one row for several features is a sequence they share."""
    if isinstance(maps, Tensor):
        if len(keys) > 1:
            raise ValueError(
                f"The features {list(keys)} are attended over as one sequence, so one relevance "
                "row covers all of them and cannot be laid on each; explain the model with "
                "captum_chefer.pyhealth.AttnLRP(model), whose relevance is per value."
            )
        return (maps,)
    return tuple(maps)


def _mapping_options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {name: options.get(name) for name in ("num_prefix_tokens", "patch_grid")}


def _shaped_like(key: str, relevance: Tensor, value: Tensor) -> Tensor:
    if relevance.shape != value.shape:
        raise ValueError(
            f"The relevance of feature {key!r} has shape {tuple(relevance.shape)}, its values "
            f"{tuple(value.shape)}; use a method that explains each input, e.g. AttnLRP."
        )
    return relevance


@contextmanager
def _pyhealth_fix(method: type) -> Iterator[None]:
    """Errors that name a class of this package as the fix name the PyHealth interpreter too."""
    try:
        yield
    except (ValueError, RuntimeError) as error:
        message = str(error)
        if "AttnLRP" in message and not issubclass(method, attr.lrp._LRPAttribution):
            raise type(error)(
                f"{message} For a PyHealth model: captum_chefer.pyhealth.AttnLRP(model)."
            ) from error
        raise


_registered: set[type] = set()
_registration = threading.Lock()


def _register_as_pyhealth_interpreter(cls: type) -> None:
    """``isinstance(interpreter, pyhealth.interpret.methods.BaseInterpreter)`` holds, where
    PyHealth is installed (imported here, on first use: the module does not need it)."""
    with _registration:
        if cls in _registered:
            return
        try:
            from pyhealth.interpret.methods import BaseInterpreter
        except ImportError:
            return
        BaseInterpreter.register(cls)
        _registered.add(cls)
