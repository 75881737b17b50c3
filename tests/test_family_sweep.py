"""Every installed transformers family and timm's ViT-like models: exact or clearly refused.

The harness lives in ``family_sweep.py``; ``python tests/family_sweep.py`` writes the table of
outcomes to ``benchmarks/results/sweep.md``. A family the harness cannot build or feed
generically (another modality, sizes that do not shrink) is reported as skipped with the
reason; every family it can run must match the reference at its default implementation and at
eager, or be refused by captum_chefer with an error that names the cause. AttnLRP and CP-LRP
run on the same models: finite maps with nothing left behind, or a clear refusal.

A causal family that matches on its unpadded batch must match on a right-padded and on a
left-padded batch too, read at each example's last real token at the default
``token_index="auto"``, with a window shorter than the input where its config has one, and give
exactly 0 at padding (the rule is defined there, so a refusal fails). A padded batch the
sweep cannot check generically is named in the table with the reason.
"""

from __future__ import annotations

import warnings

import family_sweep
import pytest


@pytest.mark.slow
@pytest.mark.parametrize("family", family_sweep.hf_families())
def test_transformers_family(family):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = family_sweep.sweep_hf(family)
    _check(outcome)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(family_sweep.TIMM_FAMILIES))
def test_timm_family(family):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = family_sweep.sweep_timm(family)
    _check(outcome)


def _check(outcome: family_sweep.Outcome) -> None:
    if outcome.result == "not run":
        pytest.skip(f"the sweep cannot run {outcome.family} generically: {outcome.detail}")
    assert outcome.result in ("exact", "refused", "no attention"), outcome.detail
    assert outcome.lrp and "FAILED" not in outcome.lrp, outcome.lrp
    if outcome.result in ("refused", "no attention"):  # some fix the refusal names must work
        assert " ok" in f" {outcome.lrp}", outcome.lrp
    for padded in outcome.padded:
        assert padded.result in ("exact", "not run"), f"{padded.side}-padded: {padded.detail}"
