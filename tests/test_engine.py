"""The lean engine: block-wise recomputation, row folding, and its agreement with the reference."""

from __future__ import annotations

import subprocess
import sys

import models
import pytest
import torch
from reference import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from captum_chefer import CheferRelevance
from captum_chefer.core import AttentionCall, attention_backward, attention_probs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _random_call(
    batch=2, heads=4, kv_heads=2, n_query=6, n_key=6, mask=None, causal=False, dtype=torch.float64
):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, n_query, 8, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, n_key, 8, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, n_key, 5, generator=g, dtype=dtype, requires_grad=True)
    return AttentionCall(q, k, v, mask, causal, 8**-0.5)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "causal"])
@pytest.mark.parametrize("block_rows", [1, 4, 6])
def test_blockwise_backward_equals_autograd_of_sdpa(mask_kind, block_rows):
    g = torch.Generator().manual_seed(1)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 6, 6, generator=g) > 0.3
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    call = _random_call(mask=mask, causal=mask_kind == "causal")
    out = torch.nn.functional.scaled_dot_product_attention(
        call.query,
        call.key,
        call.value,
        attn_mask=call.mask,
        is_causal=call.is_causal,
        enable_gqa=True,
    )
    d_out = torch.randn_like(out)
    inputs = [call.query, call.key, call.value] + ([mask] if mask_kind == "float" else [])
    expected = torch.autograd.grad(out, inputs, d_out)
    blocks = []
    grads = attention_backward(
        call, d_out, lambda rows, p, dp: blocks.append((rows, p.clone(), dp.clone())), block_rows
    )
    for actual, wanted in zip(grads, expected):
        assert_close(actual, wanted, rtol=1e-5)
    probs = torch.cat([p for _, p, _ in blocks], dim=2)
    assert_close(probs, attention_probs(call), rtol=1e-6)
    value = call.value.repeat_interleave(2, dim=1).float()
    assert_close(
        torch.cat([dp for _, _, dp in blocks], dim=2), d_out.float() @ value.transpose(-1, -2)
    )


@pytest.mark.parametrize("block_rows", [1, 4, 6])
def test_causal_key_prefix_blocks_equal_full_width_blocks(block_rows):
    call = _random_call(causal=True, n_query=6, n_key=6)
    out = torch.nn.functional.scaled_dot_product_attention(
        call.query, call.key, call.value, is_causal=True, enable_gqa=True
    )
    d_out = torch.randn_like(out)
    expected = torch.autograd.grad(out, [call.query, call.key, call.value], d_out)
    full, narrow = torch.zeros(2, 4, 6, 6), torch.zeros(2, 4, 6, 6)

    def collect(target):
        def consumer(rows, probs, grad_probs):
            target[:, :, rows, : probs.shape[-1]] = grad_probs * probs
            assert probs.shape[-1] == (min(rows.stop, 6) if target is narrow else 6)

        return consumer

    attention_backward(call, d_out, collect(full), block_rows)
    grads = attention_backward(call, d_out, collect(narrow), block_rows, key_prefix_blocks=True)
    for actual, wanted in zip(grads, expected):
        assert_close(actual, wanted, rtol=1e-5)
    assert_close(narrow, full, rtol=1e-6)


def test_fully_masked_rows_give_zero_probabilities_not_nan():
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[:, :, 2] = False
    probs = attention_probs(_random_call(mask=mask))
    assert not probs.isnan().any()
    assert (probs[:, :, 2] == 0).all()


@pytest.mark.parametrize("kind", ["bool+causal", "float"])
def test_rows_masked_everywhere_give_zero_blocks_and_finite_grads(kind):
    if kind == "float":  # row 2 blocked at every key by an additive -inf mask
        mask = torch.zeros(2, 1, 6, 6, dtype=torch.float64)
        mask[:, :, 2] = float("-inf")
    else:  # the bool mask lets row 2 see only later keys, which the causal mask then hides
        mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
        mask[:, :, 2, :3] = False
    call = _random_call(mask=mask, causal=kind != "float")
    blocks = []
    grads = attention_backward(
        call,
        torch.randn(2, 4, 6, 5, dtype=torch.float64),
        lambda r, p, g: blocks.append(p.clone()),
        4,
    )
    probs = torch.cat(blocks, dim=2)
    assert not probs.isnan().any() and (probs[:, :, 2] == 0).all()
    assert all(grad.isfinite().all() for grad in grads[:3])
    assert_close(attention_probs(call), probs, rtol=1e-6)  # the same masking, one helper


def _llama_case():
    model = models.llama()
    ids = torch.randint(5, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 18:] = 0
    forward = lambda i, m: model(i, attention_mask=m).logits[torch.arange(2), m.sum(1) - 1]  # noqa: E731
    return model, forward, ids, mask


@pytest.mark.parametrize("block_bytes", [None, 2048, 1])
def test_every_path_equals_the_matrix_path(block_bytes):
    model, forward, ids, mask = _llama_case()
    explainer = CheferRelevance(forward, model)
    reference = explainer.attribute(ids, [3, 9], (mask,), mode="matrix")
    lean = explainer.attribute(ids, [3, 9], (mask,), block_bytes=block_bytes)
    assert_close(lean, reference, rtol=1e-5)


class _FullAttentionDetector(TorchDispatchMode):
    """Records every op output shaped like a per-head (B, H, N, N) attention tensor."""

    def __init__(self, batch, heads, size):
        super().__init__()
        self.shape, self.found = (batch, heads, size, size), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape[-4:]) == self.shape:
                self.found.append(str(func))
        return out


def test_lean_path_never_materialises_per_head_attention():
    model = models.llama()
    ids = torch.randint(5, 100, (1, 64), generator=torch.Generator().manual_seed(0))
    explainer = CheferRelevance(lambda i: model(i).logits[:, -1], model)
    detector = _FullAttentionDetector(1, 4, 64)
    with detector:
        lean = explainer.attribute(ids, target=5, block_bytes=4 * 4 * 16 * 64)
    assert detector.found == []
    with detector:  # the detector itself works: the one-block path does form (B, H, N, N)
        explainer.attribute(ids, target=5, block_bytes=2**30)
    assert detector.found
    assert_close(lean, explainer.attribute(ids, target=5, mode="matrix"), rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_matches_float32(device):
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    model, forward, ids, mask = _llama_case()
    model = model.to(device)
    ids, mask = ids.to(device), mask.to(device)
    full = CheferRelevance(forward, model).attribute(ids, [3, 9], (mask,))
    half = CheferRelevance(forward, model.to(dtype)).attribute(ids, [3, 9], (mask,))
    assert half.dtype == torch.float32 and half.device.type == device
    assert_close(half, full, rtol=0.1)
    assert torch.corrcoef(torch.stack([half.flatten(), full.flatten()]))[0, 1] > 0.98


def test_multihead_attention_direct_with_and_without_weights():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    head = torch.nn.Linear(16, 3)
    x = torch.randn(2, 5, 16)
    results = {}
    for need_weights in (True, False):

        def forward(inputs, need_weights=need_weights):
            out, weights = mha(inputs, inputs, inputs, need_weights=need_weights)
            assert (weights is not None) == need_weights
            return head(out[:, 0])

        expected_out, expected_weights = mha(x, x, x, need_weights=True)
        results[need_weights] = CheferRelevance(forward, mha).attribute(x, target=1)
        out, weights = mha(x, x, x, need_weights=True)
        assert torch.equal(out, expected_out) and torch.equal(weights, expected_weights)
    assert_close(results[True], results[False], rtol=1e-6)
    assert "forward" not in vars(mha)


def test_weights_returned_during_capture_equal_the_unpatched_ones():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    expected_out, expected_weights = mha(x, x, x, average_attn_weights=False)
    seen = {}

    def forward(inputs):
        seen["out"], seen["weights"] = mha(inputs, inputs, inputs, average_attn_weights=False)
        return seen["out"][:, 0].sum(-1)

    CheferRelevance(forward, mha).attribute(x)
    assert_close(seen["out"], expected_out, rtol=1e-5)
    assert_close(seen["weights"], expected_weights, rtol=1e-5)


def test_core_imports_torch_only():
    code = (
        "import sys, captum_chefer.core; "
        "print(sorted(m for m in ('captum', 'transformers', 'timm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class _SdpaOptionsModel(torch.nn.Module):
    """Custom attention through SDPA with every option set: scale, GQA, an additive mask."""

    def __init__(self, explicit: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 16)
        self.q = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(2)])
        self.kv = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(2)])
        self.head = torch.nn.Linear(16, 3)
        self.explicit, self.kept = explicit, []

    def forward(self, ids, bias):
        x = self.embed(ids)
        batch, size, _ = x.shape
        for q_proj, kv_proj in zip(self.q, self.kv):
            q = q_proj(x).view(batch, size, 4, 4).transpose(1, 2)
            k, v = kv_proj(x).view(batch, size, 2, 8).transpose(1, 2).chunk(2, dim=-1)
            if self.explicit:
                k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
                attn = torch.softmax(q @ k.transpose(-1, -2) * 0.3 + bias, dim=-1)
                attn.retain_grad()
                self.kept.append(attn)
                out = attn @ v
            else:
                out = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=bias, scale=0.3, enable_gqa=True
                )
            x = torch.tanh(x + out.transpose(1, 2).reshape(batch, size, 16))
        return self.head(x[:, 0])


def test_sdpa_scale_gqa_and_additive_mask_are_honoured():
    from reference import one_hot_rows, read_rows, relevance_matrix

    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    bias = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    bias[1, :, :, 4:] = torch.finfo(torch.float32).min
    target = torch.tensor([0, 2])
    ours = CheferRelevance(_SdpaOptionsModel().eval()).attribute(
        ids, target, (bias,), output="token"
    )
    reference = _SdpaOptionsModel(explicit=True).double()
    reference(ids, bias.double()).gather(1, target[:, None]).sum().backward()
    kept = reference.kept
    expected = read_rows(relevance_matrix(kept, [a.grad for a in kept]), one_hot_rows([0, 0], 6))
    assert_close(ours, expected.masked_fill(bias[:, 0, 0] < -1e3, 0.0))
    assert (ours[1, 4:] == 0).all()


def test_renamed_engine_names_still_work_with_a_warning():
    from captum_chefer.core import RowPropagation

    abar = torch.tensor([[[0.0, 1.0], [0.5, 0.0]]])
    new, old = (RowPropagation(torch.tensor([[1.0, 0.0]])) for _ in range(2))
    new.open_layer()
    new.fold(slice(0, 2), abar)
    new.close_layer()
    with pytest.warns(DeprecationWarning, match="open_layer"):
        old.begin_layer()
    with pytest.warns(DeprecationWarning, match="fold"):
        old.add_block(slice(0, 2), abar)
    with pytest.warns(DeprecationWarning, match="close_layer"):
        old.end_layer()
    assert torch.equal(old.added, new.added)
    call = _random_call(causal=True)
    with pytest.warns(DeprecationWarning, match="attendable"):
        assert torch.equal(call.allowed(), call.attendable())


def test_folding_the_head_mean_into_the_row_product_equals_head_reduce():
    from captum_chefer.core import RowPropagation, head_reduce

    g = torch.Generator().manual_seed(3)
    probs = torch.rand(2, 3, 4, 5, generator=g)
    grads = torch.randn(2, 3, 4, 5, generator=g)
    start = torch.rand(2, 5, generator=g)
    by_mean, by_fold = RowPropagation(start), RowPropagation(start)
    for prop in (by_mean, by_fold):
        prop.open_layer()
    by_mean.fold(slice(1, 5), head_reduce(probs, grads))
    by_fold.fold_heads(slice(1, 5), (grads * probs).clamp(min=0))
    for prop in (by_mean, by_fold):
        prop.close_layer()
    assert_close(by_fold.added, by_mean.added, rtol=1e-6)
