"""The one pipeline behind every perturbation metric: rank, resolve the target, forward, score."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from ._features import (
    BaselineType,
    TensorOrTuple,
    format_baselines,
    format_inputs,
    rank_features,
)
from ._forward import (
    ForwardSetup,
    TargetType,
    check_chunk,
    check_score,
    format_additional_forward_args,
    resolve_target,
    run_perturbed,
    select_scores,
)

# n_features (B,) -> (counts (B, S), keep (S,))
Plan = Callable[[Tensor], tuple[Tensor, Tensor]]


def perturbation_scores(
    forward_func: Callable[..., Any],
    inputs: TensorOrTuple,
    attributions: TensorOrTuple,
    plan: Plan,
    *,
    target: TargetType,
    additional_forward_args: Any,
    baselines: BaselineType,
    feature_mask: TensorOrTuple | None,
    attention_mask: Tensor | None,
    most_relevant_first: bool,
    score: str,
    max_examples_per_batch: int | None,
    show_progress: bool | None,
    description: str,
) -> Tensor:
    """``(B, S)`` the target's score after each step of ``plan`` (see ``run_perturbed``)."""
    check_score(score)
    check_chunk(max_examples_per_batch)
    xs, attrs = format_inputs(inputs, attributions)
    ranking = rank_features(
        xs,
        attrs,
        feature_mask=feature_mask,
        attention_mask=attention_mask,
        most_relevant_first=most_relevant_first,
    )
    setup = ForwardSetup(
        forward_func,
        xs,
        format_baselines(baselines, xs),
        format_additional_forward_args(additional_forward_args),
        max_examples_per_batch,
        show_progress,
        description,
    )
    index = resolve_target(setup, ranking, target, score)
    counts, keep = plan(ranking.n_features)

    def target_score(output: Any, example: Tensor) -> Tensor:
        rows = None if index is None else index[example]
        return select_scores(output, rows, score, len(example))

    return run_perturbed(setup, ranking, counts, keep, target_score)
