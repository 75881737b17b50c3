"""What every attribution class of this package shares: the model lookup and Captum's flags.

:class:`ModelAttribution` finds the module to explain and answers Captum's
``has_convergence_delta`` / ``multiplies_by_inputs``; :class:`AttentionAttribution` adds the
one flow of the attention-reading classes (:mod:`~captum_chefer.attr.engine`). A subclass
declares a reader, a stream map and a read spec, and calls :meth:`AttentionAttribution._explain`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn

from ..core.readers import Reader
from ..families import SELF_ATTENTION, StreamMap
from ._captum import GradientAttribution, TargetType
from .engine import ReadSpec, Subject, explain


class ModelAttribution(GradientAttribution):
    """Base class: a Captum gradient attribution of one module of the user's model.

    Args:
        forward_func: the model, or any callable returning a tensor (or an object with
            ``.logits``).
        model: the module whose attention is explained, when ``forward_func`` is not one.
    """

    multiplies: ClassVar[bool] = False
    """Captum's ``multiplies_by_inputs``: whether the relevance is a gradient times the input."""

    def __init__(self, forward_func: Callable[..., Any], model: nn.Module | None = None) -> None:
        """Keep ``forward_func`` and find the module to explain (see the class's Args).

        A model or function compiled with ``torch.compile`` is explained through its original,
        eager one: the compiled graph runs attention in generated code that cannot be observed.
        """
        forward_func = uncompiled(forward_func)
        super().__init__(forward_func)
        self.model = module_or_none(uncompiled(model) if model is not None else forward_func)

    def has_convergence_delta(self) -> bool:
        """False: no method of this package returns a convergence delta (Captum's flag)."""
        return False

    def compute_convergence_delta(self, *args: Any, **kwargs: Any) -> Tensor:
        """Not available: these methods have no completeness property to measure a delta of.

        Captum's gradient methods define the delta as ``sum(attributions) - (F(input) -
        F(baseline))``. Attention relevance (Chefer, rollout, raw attention, Grad-CAM) has no
        baseline, and its sum is not meant to equal any change of the output; AttnLRP and
        CP-LRP conserve the explained logit only on bias-free models, which their ``attribute``
        documents. :meth:`has_convergence_delta` is False, so Captum's tools do not call this.

        Raises:
            NotImplementedError: always, with the reason.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no convergence delta: its relevance has no baseline and "
            "is not meant to sum to a change of the output, so has_convergence_delta() is False. "
            "To check a map, use captum.metrics.infidelity / sensitivity_max or the perturbation "
            "metrics of captum_chefer.metrics."
        )

    @classmethod
    def get_name(cls) -> str:
        """The class name with spaces before capitals, as Captum shows it ("Chefer Relevance")."""
        return super().get_name()

    @property
    def multiplies_by_inputs(self) -> bool:
        """Captum's flag: True where the relevance is a gradient times the input (the LRP
        classes), False for attention relevance."""
        return self.multiplies


class AttentionAttribution(ModelAttribution):
    """Base class: a Captum attribution read off captured attention and its gradient."""

    def _explain(
        self,
        reader: Reader,
        spec: ReadSpec,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: Any,
        block_bytes: int | None,
        streams: StreamMap = SELF_ATTENTION,
    ) -> Tensor | tuple[Tensor, ...]:
        """Run the one flow with this class's reader, stream map and read spec."""
        return explain(
            Subject(type(self).__name__, self.forward_func, self.model),
            reader,
            streams,
            spec,
            inputs,
            target,
            additional_forward_args,
            block_bytes,
        )


def module_or_none(forward_func: Callable[..., Any]) -> nn.Module | None:
    """The module to capture: ``forward_func`` itself, or the owner of a bound method."""
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def uncompiled(forward_func: Callable[..., Any]) -> Callable[..., Any]:
    """The original module or function of a ``torch.compile``d one; others unchanged.

    A compiled graph runs its attention in generated code the capture cannot see, so the
    explanation runs the original, eager module: the same function, the same weights.
    """
    original = getattr(forward_func, "_orig_mod", None)
    if isinstance(original, nn.Module):
        return original
    function = getattr(forward_func, "_torchdynamo_orig_callable", None)
    return function if callable(function) else forward_func
