"""Tests of captum_chefer.metrics against closed forms, hand-computed values and invariances."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from captum_chefer.metrics import (
    CHEFER_FRACTIONS,
    RISE_FRACTIONS,
    average_precision,
    comprehensiveness,
    deletion_auc,
    deletion_curve,
    insertion_auc,
    insertion_curve,
    perturbation_auc,
    perturbation_curve,
    pointing_game,
    segmentation_scores,
    sufficiency,
)
from captum_chefer.metrics._forward import select_scores, target_indices

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MASK, PAD = 103, 0


def _top(values: list[float], k: int, most_relevant_first: bool = True) -> set[int]:
    """The k indices ranked first, ties to the lower index (a plain replica of the ranking)."""
    sign = -1.0 if most_relevant_first else 1.0
    order = sorted(range(len(values)), key=lambda i: (sign * values[i], i))
    return set(order[:k])


def _linear_case(device: str):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 10, generator=gen, dtype=torch.float64)
    x = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    target = [0, 2, 1, 2]
    attributions = x * weight[target]  # each feature's contribution to the target logit
    weight_on_device = weight.to(device)

    def model(inputs):
        return inputs @ weight_on_device.T

    return model, weight, x, target, attributions


# --------------------------------------------------------------------------------------------
# perturbation curves


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("most_relevant_first", [True, False])
def test_perturbation_curve_linear_model_closed_form(device, most_relevant_first):
    model, weight, x, target, attributions = _linear_case(device)
    kwargs = dict(target=target, most_relevant_first=most_relevant_first)
    logits = perturbation_curve(
        model, x.to(device), attributions.to(device), score="logit", **kwargs
    )
    probs = perturbation_curve(model, x.to(device), attributions.to(device), **kwargs)
    correct = perturbation_curve(
        model, x.to(device), attributions.to(device), score="correct", **kwargs
    )
    assert logits.device.type == probs.device.type == correct.device.type == device
    for b in range(4):
        contrib = attributions[b].tolist()
        for s, f in enumerate(CHEFER_FRACTIONS):
            removed = _top(contrib, math.floor(f * 10 + 1e-9), most_relevant_first)
            kept = [c for j, c in enumerate(contrib) if j not in removed]
            assert logits[b, s].item() == pytest.approx(sum(kept), abs=1e-10)
            x_removed = x[b].clone()
            x_removed[list(removed)] = 0.0
            all_logits = x_removed @ weight.T
            expected = torch.softmax(all_logits, 0)[target[b]].item()
            assert probs[b, s].item() == pytest.approx(expected, abs=1e-10)
            assert correct[b, s].item() == float(all_logits.argmax().item() == target[b])


def test_positive_curve_falls_below_negative_curve():
    model, _, x, target, attributions = _linear_case("cpu")
    positive = perturbation_curve(model, x, attributions, target=target)
    negative = perturbation_curve(model, x, attributions, target=target, most_relevant_first=False)
    assert (positive[:, 0] == negative[:, 0]).all()  # f = 0 is the unperturbed input
    assert perturbation_auc(positive).mean() < perturbation_auc(negative).mean()


@pytest.mark.parametrize("device", DEVICES)
def test_deletion_and_insertion_linear_model_closed_form(device):
    model, _, x, target, attributions = _linear_case(device)
    args = (model, x.to(device), attributions.to(device))
    deletion = deletion_curve(*args, target=target, score="logit")
    insertion = insertion_curve(*args, target=target, score="logit")
    assert deletion.device.type == insertion.device.type == device
    for b in range(4):
        contrib = attributions[b].tolist()
        for s, f in enumerate(RISE_FRACTIONS):
            top = _top(contrib, math.floor(f * 10 + 1e-9))
            inserted = sum(contrib[j] for j in top)
            assert insertion[b, s].item() == pytest.approx(inserted, abs=1e-10)
            assert deletion[b, s].item() == pytest.approx(sum(contrib) - inserted, abs=1e-10)
    assert deletion[:, -1].abs().max() < 1e-12  # everything removed: logit 0
    assert torch.allclose(insertion[:, -1], deletion[:, 0])  # everything inserted: the input


def test_fraction_counts_are_exact_rationals():
    """floor(0.29 * 100) is 29 (float math says 28); ERASER's ceil(0.1 * 30) is 3 (not 4)."""
    seen = []

    def counting_model(ids):
        seen.append((ids == MASK).sum(1))
        return torch.stack([torch.zeros(len(ids)), (ids != MASK).sum(1).float()], 1)

    ids = torch.arange(1, 101).unsqueeze(0)
    perturbation_curve(counting_model, ids, ids.float(), fractions=(0.0, 0.29), baselines=MASK)
    assert seen[-1].tolist() == [0, 29]
    ids = torch.arange(1, 31).unsqueeze(0)
    comprehensiveness(counting_model, ids, ids.float(), bins=(0.1,), baselines=MASK, target=1)
    assert seen[-1].tolist() == [0, 3]


# --------------------------------------------------------------------------------------------
# token ids, padding, additional arguments


class TokenRecorder:
    """Class-1 logit = number of real tokens still present; records every forward's inputs."""

    def __init__(self):
        self.calls = []

    def __call__(self, ids, attention_mask):
        self.calls.append((ids.clone(), attention_mask.clone()))
        present = (attention_mask != 0) & (ids != MASK)
        return torch.stack([torch.zeros(len(ids)), present.sum(1).float()], 1)


def _padded_records():
    ids = torch.full((2, 50), PAD)
    ids[0, :5] = torch.tensor([7, 8, 9, 10, 11])
    ids[1, :8] = torch.arange(20, 28)
    mask = (ids != PAD).long()
    attributions = torch.full((2, 50), 10.0)  # padding would win any ranking
    attributions[0, :5] = torch.tensor([0.5, 0.1, 0.4, 0.2, 0.3])
    attributions[1, :8] = torch.tensor([0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    return ids, mask, attributions


def test_padding_is_excluded_from_ranking_and_from_n():
    ids, mask, attributions = _padded_records()
    model = TokenRecorder()
    curve = perturbation_curve(
        model,
        ids,
        attributions,
        target=1,
        score="logit",
        baselines=MASK,
        attention_mask=mask,
        additional_forward_args=(mask,),
        max_examples_per_batch=3,
    )
    assert [len(call[0]) for call in model.calls] == [3] * 6 + [2]  # 2 x 10 rows in chunks of 3
    rows = torch.cat([call[0] for call in model.calls])
    seen_masks = torch.cat([call[1] for call in model.calls])
    assert torch.equal(seen_masks, mask.repeat_interleave(10, 0))  # the batched arg follows
    order = [[0, 2, 4, 3, 1], list(range(8))]
    for b, n_real in enumerate([5, 8]):
        for s, f in enumerate(CHEFER_FRACTIONS):
            k = math.floor(f * n_real + 1e-9)
            row = rows[b * 10 + s]
            assert (row == MASK).sum().item() == k
            assert set((row == MASK).nonzero().flatten().tolist()) == set(order[b][:k])
            assert torch.equal(row[n_real:], ids[b, n_real:])  # padding untouched
            assert curve[b, s].item() == n_real - k


def test_insertion_keeps_padding_as_padding():
    ids, mask, attributions = _padded_records()
    model = TokenRecorder()
    curve = insertion_curve(
        model,
        ids,
        attributions,
        target=1,
        score="logit",
        baselines=MASK,
        attention_mask=mask,
        additional_forward_args=mask,
    )
    rows = model.calls[-1][0].view(2, 11, 50)
    assert (rows[0, :, 5:] == PAD).all() and (rows[1, :, 8:] == PAD).all()
    expected = [[math.floor(f * n + 1e-9) for f in RISE_FRACTIONS] for n in (5, 8)]
    assert curve.tolist() == [[float(v) for v in row] for row in expected]


def test_non_batch_additional_forward_args_pass_unchanged():
    received = []

    def model(x, scale, shared, flag):
        received.append((scale.shape, shared.shape, flag))
        return (x * scale + shared).sum(1, keepdim=True)

    x = torch.ones(2, 3)
    scale = torch.tensor([[1.0], [2.0]])
    shared = torch.zeros(3)
    curve = perturbation_curve(
        model,
        x,
        torch.tensor([[3.0, 2.0, 1.0]]).expand(2, 3),
        target=0,
        additional_forward_args=(scale, shared, "flag"),
        fractions=(0.0, 0.5),
        score="logit",
    )
    assert received == [(torch.Size([4, 1]), torch.Size([3]), "flag")]
    assert curve.tolist() == [[3.0, 2.0], [6.0, 4.0]]


# --------------------------------------------------------------------------------------------
# features: groups, tuples, ties, broadcast maps


def test_feature_mask_groups_ranked_by_summed_attribution_with_ties_to_lower_id():
    weight = torch.tensor([1.0, 1.0, 5.0, -1.0, 2.0, 2.0])
    x = torch.ones(1, 6)

    def model(inputs):
        return inputs @ weight.unsqueeze(1)

    # group sums: id 7 -> 2, id 3 -> 4, id 9 -> 4; the tie 3/9 goes to id 3 (lower) first
    feature_mask = torch.tensor([[7, 7, 3, 3, 9, 9]])
    curve = perturbation_curve(
        model,
        x,
        x * weight,
        feature_mask=feature_mask,
        fractions=(0.0, 1 / 3, 2 / 3),
        score="logit",
    )
    assert curve.tolist() == [[10.0, 6.0, 2.0]]


@pytest.mark.parametrize("most_relevant_first", [True, False])
def test_feature_groups_rank_as_a_plain_reference_with_padding_and_any_ids(most_relevant_first):
    """Groups with any ids (negative, large, absent from some examples, shared across the
    tensors of a tuple, per example or broadcast) rank as a loop over each example's groups
    says: by summed attribution of their real elements, ties to the lower id, groups with no
    real element never counted."""
    from captum_chefer.metrics._features import rank_features

    generator = torch.Generator().manual_seed(12)
    inputs = (torch.zeros(3, 5), torch.zeros(3, 5, 4))
    attributions = (
        torch.randint(-2, 3, (3, 5), generator=generator).float(),  # integers: many ties
        torch.randint(-2, 3, (3, 5, 4), generator=generator).float(),
    )
    ids = torch.tensor([-3, 0, 2, 6, 1000])
    masks = (
        ids[torch.randint(0, 5, (3, 5), generator=generator)],
        ids[torch.randint(0, 5, (1, 5, 4), generator=generator)],
    )
    attention = torch.ones(3, 5, dtype=torch.long)
    attention[1, 3:] = 0
    attention[2, :1] = 0
    ranking = rank_features(
        inputs,
        attributions,
        feature_mask=masks,
        attention_mask=attention,
        most_relevant_first=most_relevant_first,
    )
    for example in range(3):
        sums: dict[int, float] = {}
        groups = []  # (group, real) for each element, in flat order across the tuple
        for mask, attribution, x in zip(masks, attributions, inputs):
            full_mask = torch.broadcast_to(mask, x.shape)[example].flatten().tolist()
            values = attribution[example].flatten().tolist()
            real = torch.broadcast_to(
                attention[example].view(5, *(1,) * (x.dim() - 2)), x.shape[1:]
            )
            for group, value, is_real in zip(full_mask, values, real.flatten().tolist()):
                groups.append((group, is_real))
                if is_real:
                    sums[group] = sums.get(group, 0.0) + value
        sign = -1 if most_relevant_first else 1
        order = sorted(sums, key=lambda group: (sign * sums[group], group))
        expected = [order.index(group) for group, is_real in groups if is_real]
        flat_ranks = torch.cat([rank[example].flatten() for rank in ranking.ranks])
        real_flat = torch.tensor([bool(is_real) for _, is_real in groups])
        assert flat_ranks[real_flat].tolist() == expected
        assert int(ranking.n_features[example]) == len(sums)


def test_tuple_inputs_rank_jointly_and_share_feature_ids():
    def model(a, b):
        return (a * torch.tensor([1.0, 10.0])).sum(1, keepdim=True) + (
            b * torch.tensor([100.0, 1000.0])
        ).sum(1, keepdim=True)

    a, b = torch.ones(1, 2), torch.ones(1, 2)
    joint = perturbation_curve(
        model,
        (a, b),
        (torch.tensor([[5.0, 1.0]]), torch.tensor([[3.0, 4.0]])),
        fractions=(0.0, 0.25, 0.5, 0.75),
        score="logit",
    )
    # joint order a0 (5), b1 (4), b0 (3), a1 (1)
    assert joint.tolist() == [[1111.0, 1110.0, 110.0, 10.0]]
    grouped = perturbation_curve(
        model,
        (a, b),
        (torch.tensor([[3.0, 1.0]]), torch.tensor([[1.0, 0.0]])),
        feature_mask=(torch.tensor([[0, 1]]), torch.tensor([[1, 2]])),
        fractions=(0.0, 1 / 3, 2 / 3),
        score="logit",
    )
    # group sums: 0 -> 3 (a0), 1 -> 2 (a1 and b0), 2 -> 0 (b1)
    assert grouped.tolist() == [[1111.0, 1110.0, 1000.0]]


@pytest.mark.parametrize("most_relevant_first", [True, False])
def test_ties_go_to_the_lower_index_first(most_relevant_first):
    weight = torch.tensor([1.0, 10.0, 100.0, 1000.0])

    def model(x):
        return x @ weight.unsqueeze(1)

    x = torch.ones(1, 4)
    curve = perturbation_curve(
        model,
        x,
        torch.ones(1, 4),
        fractions=(0.0, 0.25, 0.5, 0.75),
        score="logit",
        most_relevant_first=most_relevant_first,
    )
    assert curve.tolist() == [[1111.0, 1110.0, 1100.0, 1000.0]]


@pytest.mark.parametrize("most_relevant_first", [True, False])
def test_ties_among_many_features_stay_in_index_order(most_relevant_first):
    seen = []

    def model(x):
        seen.append(x.clone())
        return x.sum(1, keepdim=True)

    attributions = (torch.arange(120) % 3 == 0).float().unsqueeze(0)  # 40 ones, 80 zeros
    perturbation_curve(
        model,
        torch.ones(1, 120),
        attributions,
        target=0,
        score="logit",
        fractions=(0.25, 0.5),
        most_relevant_first=most_relevant_first,
    )
    for row, k in zip(seen[-1], (30, 60), strict=True):
        expected = _top(attributions[0].tolist(), k, most_relevant_first)
        assert set((row == 0).nonzero().flatten().tolist()) == expected


def test_broadcast_map_removes_whole_pixels_with_per_example_baselines():
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 4, 4, generator=gen) + 1.0
    maps = torch.rand(2, 1, 4, 4, generator=gen)
    baselines = torch.stack([torch.zeros(3, 4, 4), -torch.ones(3, 4, 4)])
    seen = []

    def model(x):
        seen.append(x.clone())
        return x.flatten(1)[:, :2]

    perturbation_curve(model, images, maps, baselines=baselines, fractions=(0.0, 0.5))
    rows = seen[-1].view(2, 2, 3, 4, 4)
    for b, fill in enumerate([0.0, -1.0]):
        replaced = rows[b, 1] == fill
        assert replaced.sum().item() == 3 * 8  # floor(0.5 * 16) pixels, all 3 channels
        assert (replaced.all(0) == replaced.any(0)).all()  # whole pixels only
        top = maps[b, 0].flatten().topk(8).indices
        assert set(replaced[0].flatten().nonzero().flatten().tolist()) == set(top.tolist())


# --------------------------------------------------------------------------------------------
# batching, chunking, side effects


def _mlp_case():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    attributions = torch.randn(4, 6, dtype=torch.float64)
    scale = torch.rand(4, 1, dtype=torch.float64) + 0.5

    def model(inputs, factor):
        return net(inputs * factor)

    return model, x, attributions, scale


@pytest.mark.parametrize(
    "metric", [perturbation_curve, deletion_curve, insertion_curve, comprehensiveness, sufficiency]
)
@pytest.mark.parametrize("target", [None, [2, 0, 1, 1]])
def test_batch_equals_separate_calls(metric, target):
    model, x, attributions, scale = _mlp_case()
    batched = metric(
        model,
        x,
        attributions,
        target=target,
        additional_forward_args=(scale,),
        max_examples_per_batch=7,
    )
    batched = batched.per_example if isinstance(batched, tuple) else batched
    for b in range(4):
        single = metric(
            model,
            x[b : b + 1],
            attributions[b : b + 1],
            target=None if target is None else target[b],
            additional_forward_args=(scale[b : b + 1],),
        )
        single = single.per_example if isinstance(single, tuple) else single
        assert torch.allclose(batched[b], single[0], atol=1e-12)


def test_nothing_is_modified_in_place():
    ids, mask, attributions = _padded_records()
    feature_mask = torch.arange(50).unsqueeze(0)
    baseline = torch.full((50,), MASK)
    originals = [t.clone() for t in (ids, mask, attributions, feature_mask, baseline)]
    kwargs = dict(
        target=1,
        baselines=baseline,
        attention_mask=mask,
        additional_forward_args=(mask,),
        feature_mask=feature_mask,
    )
    model = TokenRecorder()
    for metric in (perturbation_curve, deletion_curve, insertion_curve):
        metric(model, ids, attributions, **kwargs)
    comprehensiveness(model, ids, attributions, **kwargs)
    sufficiency(model, ids, attributions, **kwargs)
    maps, seg = torch.rand(2, 3, 3), torch.randint(0, 2, (2, 1, 3, 3))
    saved_maps, saved_seg = maps.clone(), seg.clone()
    pointing_game(maps, seg)
    segmentation_scores(maps, seg)
    for now, before in zip(
        (ids, mask, attributions, feature_mask, baseline), originals, strict=True
    ):
        assert torch.equal(now, before)
    assert torch.equal(maps, saved_maps) and torch.equal(seg, saved_seg)


def test_progress_bar_can_be_switched_on(capsys):
    model, x, attributions, scale = _mlp_case()
    kwargs = dict(additional_forward_args=scale, max_examples_per_batch=5)
    perturbation_curve(model, x, attributions, show_progress=True, **kwargs)
    assert "perturbation" in capsys.readouterr().err
    perturbation_curve(model, x, attributions, **kwargs)  # default: off when not a terminal
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------------------------
# targets


def test_target_forms_follow_captum_expansion():
    captum_common = pytest.importorskip("captum._utils.common")
    output = torch.randn(3 * 4, 5, 6)
    example = torch.arange(12) // 4  # 3 examples x 4 steps, example-major
    for target in [(1, 2), [(0, 1), (4, 5), (2, 2)]]:
        expected = captum_common._select_targets(
            output,
            captum_common._expand_target(
                target, 4, expansion_type=captum_common.ExpansionTypes.repeat_interleave
            ),
        )
        ours = select_scores(output, target_indices(target, 3, output.device)[example], "logit", 12)
        assert torch.equal(ours, expected)
    flat = output[:, 0]
    for target in [3, torch.tensor(2), torch.tensor([0, 5, 1]), [1, 4, 0]]:
        expected = captum_common._select_targets(
            flat,
            captum_common._expand_target(
                target, 4, expansion_type=captum_common.ExpansionTypes.repeat_interleave
            ),
        )
        ours = select_scores(flat, target_indices(target, 3, flat.device)[example], "logit", 12)
        assert torch.equal(ours, expected)


def test_tuple_targets_on_token_level_outputs():
    def model(x):  # (B, T, C): class scores per position
        return torch.stack([x, 2 * x], -1)

    x = torch.tensor([[1.0, 3.0, 2.0]])
    curve = perturbation_curve(model, x, x, target=(1, 1), fractions=(0.0, 1 / 3), score="logit")
    assert curve.tolist() == [[6.0, 0.0]]
    prob = perturbation_curve(model, x, x, target=[(2, 0)], fractions=(0.0,))
    assert prob.item() == pytest.approx(torch.softmax(torch.tensor([2.0, 4.0]), 0)[0].item())


def test_target_none_uses_the_predicted_class_or_the_single_output():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])

    def model(x):
        return x @ weight.T

    x = torch.tensor([[3.0, 1.0], [1.0, 3.0]])
    curve = perturbation_curve(model, x, x, fractions=(0.0, 0.5), score="logit")
    assert curve.tolist() == [[3.0, 0.0], [3.0, 0.0]]  # classes 0 and 1, their top feature gone
    single = perturbation_curve(lambda v: v.sum(1), x, x, fractions=(0.0, 0.5), score="logit")
    assert single.tolist() == [[4.0, 1.0], [4.0, 1.0]]


# --------------------------------------------------------------------------------------------
# areas


def test_perturbation_auc_on_known_curves():
    curve = torch.tensor([[1.0 - f for f in CHEFER_FRACTIONS], [1.0] * 10], dtype=torch.float64)
    # integral of (1 - x) over [0, 0.9] = 0.9 - 0.405; a constant 1 gives 0.9
    assert perturbation_auc(curve).tolist() == pytest.approx([49.5, 90.0])
    assert perturbation_auc(curve, reduction="mean").item() == pytest.approx(69.75)
    steps = torch.tensor([1.0, 0.0, 0.0, 0.5])
    assert perturbation_auc(steps, (0.0, 0.1, 0.3, 0.4)).item() == pytest.approx(
        100 * (0.05 + 0.0 + 0.025)
    )


def test_deletion_and_insertion_auc_are_normalised_by_the_grid_width():
    line = torch.tensor([1.0 - f for f in RISE_FRACTIONS], dtype=torch.float64)
    assert deletion_auc(line).item() == pytest.approx(0.5)
    assert insertion_auc(1.0 - line).item() == pytest.approx(0.5)
    assert deletion_auc(torch.full((2, 3), 0.7), (0.5, 0.75, 1.0)).tolist() == pytest.approx(
        [0.7, 0.7]
    )
    assert insertion_auc(torch.tensor([0.0, 1.0]), (0.0, 0.5)).item() == pytest.approx(0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.long])
def test_areas_equal_torch_trapezoid_on_uneven_grids(dtype):
    """The areas are summed with the grid's spacings as Python numbers (no upload of the
    grid): the same as ``torch.trapezoid`` over the grid as a tensor."""
    generator = torch.Generator().manual_seed(11)
    fractions = (0.0, 0.05, 0.2, 0.45, 0.5, 0.9)
    curve = (torch.rand(3, 2, 6, generator=generator, dtype=torch.float64) * 10).to(dtype)
    values = curve if curve.is_floating_point() else curve.float()
    grid = torch.tensor(fractions, dtype=values.dtype)
    area = torch.trapezoid(values, grid, dim=-1)
    torch.testing.assert_close(perturbation_auc(curve, fractions), area * 100)
    torch.testing.assert_close(deletion_auc(curve, fractions), area / 0.9)
    torch.testing.assert_close(
        insertion_auc(curve, fractions, reduction="mean"), (area / 0.9).mean()
    )
    assert perturbation_auc(curve, fractions).dtype == values.dtype


# --------------------------------------------------------------------------------------------
# ERASER


def _eraser_case():
    values = torch.zeros(200)
    real_ids = torch.arange(1, 11)
    values[real_ids] = torch.tensor([0.3, -0.2, 1.5, 0.1, 0.9, -0.4, 0.6, 0.05, 1.1, 0.2])
    ids = torch.full((1, 16), PAD)
    ids[0, :10] = real_ids
    mask = (ids != PAD).long()

    def model(tokens):
        return torch.stack([torch.zeros(len(tokens)), values[tokens].sum(1)], 1)

    return model, ids, mask, values[ids]  # attributions: each token's contribution


def test_eraser_hand_computed():
    model, ids, mask, attributions = _eraser_case()
    contrib = attributions[0, :10].tolist()
    total = sum(contrib)
    ks = [1, 1, 1, 2, 5]  # ceil(q * 10) for q = 1, 5, 10, 20, 50 %
    tops = [sum(sorted(contrib, reverse=True)[:k]) for k in ks]

    def sigmoid(v):
        return 1 / (1 + math.exp(-v))

    expected_comp = sum(sigmoid(total) - sigmoid(total - t) for t in tops) / 5
    expected_suff = sum(sigmoid(total) - sigmoid(t) for t in tops) / 5
    kwargs = dict(target=1, baselines=MASK, attention_mask=mask)
    comp = comprehensiveness(model, ids, attributions, **kwargs)
    suff = sufficiency(model, ids, attributions, **kwargs)
    assert comp.per_example.tolist() == pytest.approx([expected_comp], abs=1e-6)
    assert comp.mean.item() == pytest.approx(expected_comp, abs=1e-6)
    assert suff.per_example.tolist() == pytest.approx([expected_suff], abs=1e-6)


def test_eraser_counts_real_tokens_only():
    _, ids, mask, attributions = _eraser_case()
    recorder = TokenRecorder()
    kwargs = dict(target=1, baselines=MASK, attention_mask=mask, additional_forward_args=mask)
    comprehensiveness(recorder, ids, attributions, **kwargs)
    rows = recorder.calls[-1][0]
    assert (rows == MASK).sum(1).tolist() == [0, 1, 1, 1, 2, 5]
    sufficiency(recorder, ids, attributions, **kwargs)
    rows = recorder.calls[-1][0]
    assert (rows == MASK).sum(1).tolist() == [0, 9, 9, 9, 8, 5]  # only the top-k kept
    assert (rows[:, 10:] == PAD).all()
    short = ids[:, :7].clone()
    comprehensiveness(
        recorder,
        short,
        attributions[:, :7],
        bins=(0.2,),
        baselines=MASK,
        target=1,
        additional_forward_args=torch.ones_like(short),
    )
    assert (recorder.calls[-1][0] == MASK).sum(1).tolist() == [0, 2]  # ceil(0.2 * 7)


# --------------------------------------------------------------------------------------------
# localization


def test_pointing_game_hand_made_masks():
    maps = torch.zeros(3, 2, 3, 3)
    maps[0, 0, 0, 0] = 1.0
    maps[0, 1, 2, 2] = 0.8  # channel 1 alone peaks at (2, 2)
    maps[0, 1, 0, 0] = 0.5  # but the channel sum peaks at (0, 0): 1.5 > 0.8
    maps[1, 0, 1, 1] = 2.0
    # example 2: all zeros, a tie everywhere: the first pixel (0, 0) is the maximum
    mask = torch.zeros(3, 1, 3, 3, dtype=torch.bool)
    mask[0, 0, 0, 0] = True
    mask[1, 0, 0, 0] = True
    mask[2, 0, 0, 0] = True
    result = pointing_game(maps, mask)
    assert result.per_example.tolist() == [1.0, 0.0, 1.0]
    assert result.mean.item() == pytest.approx(2 / 3)
    # channel 1 alone: example 0 now misses, example 1 is all zeros and points at (0, 0)
    assert pointing_game(maps[:, 1], mask[:, 0]).per_example.tolist() == [0.0, 1.0, 1.0]


def test_segmentation_scores_hand_computed():
    maps = torch.tensor([[[0.0, 1.0, 2.0], [2.0, 3.0, 4.0]]])
    mask = torch.tensor([[[0, 0, 1], [0, 1, 1]]])
    scores = segmentation_scores(maps, mask)
    # normalised [0, .25, .5, .5, .75, 1], mean .5: foreground = the last two pixels only
    assert scores.pixel_accuracy.tolist() == pytest.approx([5 / 6])
    assert scores.intersection.tolist() == [[3.0, 2.0]] and scores.union.tolist() == [[4.0, 3.0]]
    assert scores.miou.tolist() == pytest.approx([(3 / 4 + 2 / 3) / 2])
    # pooled AP over (1 - map, map); score .5 is one tie group of 4 holding 2 positives:
    # (2/6) * 1 + (2/6) * 1 + (2/6) * 6/8 (without tie groups it would be 0.948)
    assert scores.average_precision.tolist() == pytest.approx([5.5 / 6])
    assert scores.mean_average_precision.item() == pytest.approx(5.5 / 6)


def test_segmentation_pooled_means_and_constant_maps():
    maps = torch.stack([torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.ones(2, 2)])
    mask = torch.tensor([[[0, 1], [0, 1]], [[1, 1], [1, 0]]])
    scores = segmentation_scores(maps.unsqueeze(1), mask.unsqueeze(1))
    # example 1 is perfect; example 2 (constant) predicts all background
    assert scores.pixel_accuracy.tolist() == pytest.approx([1.0, 0.25])
    assert scores.intersection.tolist() == [[2.0, 2.0], [1.0, 0.0]]
    assert scores.union.tolist() == [[2.0, 2.0], [4.0, 3.0]]
    assert scores.miou.tolist() == pytest.approx([1.0, 0.125])
    assert scores.mean_iou.item() == pytest.approx((3 / 6 + 2 / 5) / 2)  # pooled as the paper
    assert scores.mean_pixel_accuracy.item() == pytest.approx(0.625)
    assert not torch.isnan(scores.average_precision).any()


def test_average_precision_hand_computed_and_ties():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.5, 0.5, 0.5, 0.1], [0.3, 0.2, 0.1, 0.0]])
    labels = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    # row 2: one tie group of 3 holding both positives: precision 2/3 for each
    assert average_precision(scores, labels).tolist() == pytest.approx([(1 + 2 / 3) / 2, 2 / 3, 0])


def test_average_precision_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, (6, 40), generator=gen).double() / 4  # many ties
    labels = torch.rand(6, 40, generator=gen) > 0.6
    ours = average_precision(scores, labels)
    for row in range(6):
        expected = metrics.average_precision_score(labels[row].numpy(), scores[row].numpy())
        assert ours[row].item() == pytest.approx(expected)


@pytest.mark.parametrize("device", DEVICES)
def test_localization_stays_on_device(device):
    maps = torch.rand(2, 3, 4, 4, device=device)
    mask = torch.rand(2, 4, 4, device=device) > 0.5
    assert pointing_game(maps, mask).per_example.device.type == device
    scores = segmentation_scores(maps, mask)
    assert all(field.device.type == device for field in scores)


# --------------------------------------------------------------------------------------------
# errors


def _simple():
    def model(x):
        return x @ torch.ones(4, 2)

    return model, torch.ones(2, 4), torch.ones(2, 4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(fractions=()), ValueError, "empty"),
        (dict(fractions=(0.0, 0.5, 0.2)), ValueError, "increasing"),
        (dict(fractions=(0.0, 1.0)), ValueError, r"\[0, 1\)"),
        (dict(fractions=(-0.1, 0.5)), ValueError, r"\[0, 1\)"),
        (dict(score="accuracy"), ValueError, "score"),
        (dict(feature_mask=torch.zeros(2, 3, dtype=torch.long)), ValueError, "feature_mask"),
        (dict(feature_mask=torch.zeros(2, 4)), TypeError, "integer"),
        (dict(attention_mask=torch.ones(2, 5)), ValueError, "attention_mask"),
        (dict(baselines=torch.zeros(3)), ValueError, "broadcast"),
        (dict(target=[0, 1, 1]), ValueError, "3 entries"),
        (dict(target=(0, 1)), ValueError, "index"),
        (dict(max_examples_per_batch=0), ValueError, "positive"),
    ],
)
def test_perturbation_curve_bad_arguments(kwargs, error, match):
    model, x, attributions = _simple()
    with pytest.raises(error, match=match):
        perturbation_curve(model, x, attributions, **kwargs)


def test_shape_and_structure_errors():
    model, x, attributions = _simple()
    with pytest.raises(ValueError, match="attributions"):
        perturbation_curve(model, x, torch.ones(2, 5))
    with pytest.raises(TypeError, match="same structure"):
        perturbation_curve(model, (x,), attributions)
    with pytest.raises(ValueError, match="NaN"):
        perturbation_curve(model, x, torch.full((2, 4), float("nan")))
    with pytest.raises(TypeError, match="integer"):
        perturbation_curve(model, torch.ones(2, 4, dtype=torch.long), x, baselines=0.5)
    with pytest.raises(TypeError, match="tensor"):
        perturbation_curve(lambda v: v.tolist(), x, attributions)
    with pytest.raises(ValueError, match="score='logit'"):
        perturbation_curve(lambda v: v.sum(1), x, attributions)  # one value, score="prob"
    with pytest.raises(ValueError, match="tuple target"):
        perturbation_curve(lambda v: v.unsqueeze(-1).expand(2, 4, 3), x, attributions)
    with pytest.raises(ValueError, match="bins"):
        comprehensiveness(model, x, attributions, bins=(0.0, 0.5))


def test_auc_and_localization_errors():
    with pytest.raises(ValueError, match="points"):
        perturbation_auc(torch.ones(2, 3))
    with pytest.raises(ValueError, match="start at 0.0"):
        perturbation_auc(torch.ones(2), (0.1, 0.2))
    with pytest.raises(ValueError, match="reduction"):
        deletion_auc(torch.ones(11), reduction="sum")
    with pytest.raises(ValueError, match="two fractions"):
        insertion_auc(torch.ones(1), (0.0,))
    with pytest.raises(ValueError, match="mask"):
        segmentation_scores(torch.rand(1, 4, 4), torch.ones(1, 3, 3))
    with pytest.raises(ValueError, match="mask"):
        pointing_game(torch.rand(2, 3, 4, 4), torch.ones(2, 3, 4, 4))


# --------------------------------------------------------------------------------------------
# architecture


def test_metrics_import_only_torch_tqdm_and_the_standard_library():
    allowed = {"torch", "tqdm", "__future__", "collections", "dataclasses", "fractions", "sys"}
    allowed |= {"typing", "math", "numbers"}
    folder = Path(__file__).resolve().parents[1] / "captum_chefer" / "metrics"
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
