"""The one place where Captum's private helpers are imported.

Captum's public contract (targets, ``additional_forward_args``, tuple in/tuple out) is
implemented by these helpers; importing them here keeps a Captum upgrade to one file.
"""

from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
    _is_tuple,
    _run_forward,
    _select_targets,
)
from captum._utils.typing import TargetType, TokenizerLike
from captum.attr import Attribution, GradientAttribution, LLMAttributionResult, TextTokenInput
from captum.attr._core.llm_attr import DEFAULT_GEN_ARGS, _convert_ids_to_pretty_tokens
from captum.log import log_usage

__all__ = [
    "DEFAULT_GEN_ARGS",
    "Attribution",
    "GradientAttribution",
    "LLMAttributionResult",
    "TargetType",
    "TextTokenInput",
    "TokenizerLike",
    "_convert_ids_to_pretty_tokens",
    "_format_additional_forward_args",
    "_format_output",
    "_format_tensor_into_tuples",
    "_is_tuple",
    "_run_forward",
    "_select_targets",
    "log_usage",
]
