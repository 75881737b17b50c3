"""AttnLRP and CP-LRP through the model's fused attention kernel, at the cost of a gradient.

The rules on ``scaled_dot_product_attention`` are its ordinary gradient with queries and keys
scaled by 1/4 and values by 1/2 (AttnLRP), or with queries and keys detached (CP-LRP). Each
test compares that with an independent explicit form: :func:`attention_rule` for one call, and
for whole models the same weights at ``eager``, whose hand-written softmax and matmuls get the
explicit rules; in float64. The old code decomposed every SDPA call into an explicit
``softmax(QKᵀ)V`` and kept each ``(B, H, N, N)`` map.
"""

from __future__ import annotations

import copy
import math

import models
import pytest
import torch
import torch.nn.functional as F
from reference_lrp import explicit_attention
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from captum_chefer import CPLRP, AttnLRP
from captum_chefer.capture import lrp
from captum_chefer.core.lrp import attention_rule, fused_attention_rule

RULES = {"attnlrp": AttnLRP, "cplrp": CPLRP}


def _masks(batch: int, heads: int, n: int) -> dict[str, object]:
    generator = torch.Generator().manual_seed(4)
    boolean = torch.rand(batch, 1, n, n, generator=generator) > 0.3
    boolean[..., 0] = True  # every row attends somewhere
    additive = torch.randn(batch, heads, n, n, dtype=torch.float64, generator=generator)
    return {"none": None, "bool": boolean, "float with grad": additive.requires_grad_()}


@pytest.mark.parametrize("conservative", [False, True], ids=["AttnLRP", "CP-LRP"])
@pytest.mark.parametrize(  # SDPA takes no explicit mask together with is_causal
    ("mask", "causal"),
    [("none", False), ("none", True), ("bool", False), ("float with grad", False)],
)
@pytest.mark.parametrize("grouped", [False, True], ids=["MHA", "GQA"])
def test_the_fused_rule_equals_the_explicit_rule(conservative, mask, causal, grouped):
    """Gradients into queries, keys, values and a learned float mask, with a scale, causal or
    not, grouped heads or not: the fused kernel's rescaled gradient is the explicit rule's."""
    generator = torch.Generator().manual_seed(3)
    heads, kv_heads = 4, 2 if grouped else 4
    q = torch.randn(2, heads, 6, 8, dtype=torch.float64, generator=generator)
    k, v = (torch.randn(2, kv_heads, 6, 8, dtype=torch.float64, generator=generator) for _ in "kv")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    attn_mask = _masks(2, heads, 6)[mask]
    options = {"is_causal": causal, "scale": 0.3, "enable_gqa": grouped}
    fused = fused_attention_rule(
        F.scaled_dot_product_attention, *leaves, attn_mask, conservative=conservative, **options
    )
    explicit = attention_rule(*leaves, attn_mask, causal, 0.3, conservative=conservative)
    assert torch.allclose(fused, explicit, atol=1e-12)
    weights = torch.randn(fused.shape, dtype=torch.float64, generator=generator)
    inputs = leaves + ([attn_mask] if mask == "float with grad" else [])
    ours = torch.autograd.grad((fused * weights).sum(), inputs, allow_unused=True)
    theirs = torch.autograd.grad((explicit * weights).sum(), inputs, allow_unused=True)
    for a, b in zip(ours, theirs):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-12)


def _hf(family: str, implementation: str):
    import transformers

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                  attn_implementation=implementation)  # fmt: skip
    if family == "bert":
        return transformers.BertForSequenceClassification(
            transformers.BertConfig(vocab_size=80, num_hidden_layers=2, **common)
        )
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=80, num_hidden_layers=2,
                                          num_key_value_heads=2, **common)  # fmt: skip
        return transformers.LlamaForCausalLM(config)
    if family == "mistral":
        config = transformers.MistralConfig(
            vocab_size=80, num_hidden_layers=2, num_key_value_heads=2, sliding_window=3, **common
        )
        return transformers.MistralForCausalLM(config)
    if family == "vit":
        config = transformers.ViTConfig(image_size=16, patch_size=4, num_hidden_layers=2,
                                        num_labels=3, **common)  # fmt: skip
        return transformers.ViTForImageClassification(config)
    raise ValueError(family)


def _inputs(family: str):
    generator = torch.Generator().manual_seed(5)
    if family == "vit":
        return torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=generator), None
    ids = torch.randint(3, 80, (2, 8), generator=generator)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return ids, mask


def _run(family: str, rule: str, model, x, mask):
    if family == "vit":
        return RULES[rule](lambda p: model(pixel_values=p).logits, model).attribute(x, 1)
    select = (lambda out: out[:, -1]) if family in ("llama", "mistral") else (lambda out: out)
    explainer = RULES[rule](lambda i, m: select(model(i, attention_mask=m).logits), model)
    return explainer.attribute(x, 1, (mask,))


@pytest.mark.parametrize("rule", ["attnlrp", "cplrp"])
@pytest.mark.parametrize("family", ["bert", "llama", "mistral", "vit"])
def test_hugging_face_at_sdpa_equals_the_explicit_route(family, rule):
    """The same model at ``sdpa``, float64, padded (and GQA, causal, a sliding window): the
    fused rule equals the old explicit route to 1e-9."""
    model = _hf(family, "sdpa").double().eval()
    x, mask = _inputs(family)
    ours = _run(family, rule, model, x, mask)
    with explicit_attention() as decomposed:
        explicit = _run(family, rule, model, x, mask)
    assert decomposed[0] >= 2  # every layer's SDPA call took the explicit route
    torch.testing.assert_close(ours, explicit, rtol=1e-9, atol=1e-12)
    assert bool((ours != 0).any())


@pytest.mark.parametrize("rule", ["attnlrp", "cplrp"])
@pytest.mark.parametrize("family", ["bert", "vit"])
def test_hugging_face_at_sdpa_equals_the_same_weights_at_eager(family, rule):
    """At ``eager`` the model's own softmax and matmuls get the explicit rules. Its softmax runs
    in float32 (Hugging Face casts it), hence the tolerance."""
    sdpa = _hf(family, "sdpa").double().eval()
    eager = _hf(family, "eager").double().eval()
    eager.load_state_dict(sdpa.state_dict())
    x, mask = _inputs(family)
    ours, explicit = _run(family, rule, sdpa, x, mask), _run(family, rule, eager, x, mask)
    torch.testing.assert_close(ours, explicit, rtol=1e-4, atol=1e-9)


class ExplicitEncoder(nn.Module):
    """``nn.TransformerEncoder``'s post-norm layers written out with the same weights."""

    def __init__(self, model: models.EncoderClassifier) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)

    def forward(self, x, padding_mask):
        for layer in self.model.encoder.layers:
            mha = layer.self_attn
            q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
            q, k, v = (t.unflatten(-1, (mha.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            scores = scores.masked_fill(padding_mask[:, None, None, :], float("-inf"))
            out = mha.out_proj((scores.softmax(-1) @ v).transpose(1, 2).flatten(2))
            x = layer.norm1(x + out)
            x = layer.norm2(x + layer.linear2(F.relu(layer.linear1(x))))
        return self.model.head(x[:, 0])


@pytest.mark.parametrize("rule", ["attnlrp", "cplrp"])
def test_multihead_attention_keeps_its_fused_kernel_and_equals_the_explicit_form(rule):
    model = models.EncoderClassifier().double().eval()
    x = torch.randn(2, 6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    ours = RULES[rule](model).attribute(x, 2, (padding,))
    explicit = RULES[rule](ExplicitEncoder(model)).attribute(x, 2, (padding,))
    torch.testing.assert_close(ours, explicit, rtol=1e-9, atol=1e-12)


class _Largest(TorchDispatchMode):
    """The number of elements of the largest tensor any operation makes."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("rule", ["attnlrp", "cplrp"])
def test_no_attention_map_is_formed_on_the_fused_path(rule):
    """At 256 tokens a ``(1, 4, N, N)`` map would be 262144 elements, far more than anything
    else this model makes (the logits are ``(1, N, 80)``); none is made, forward or backward."""
    model = _hf("llama", "sdpa").eval()
    ids = torch.randint(3, 80, (1, 256), generator=torch.Generator().manual_seed(7))
    explainer = RULES[rule](lambda i: model(i).logits[:, -1], model)
    with _Largest() as seen:
        explainer.attribute(ids, 1)
    assert seen.largest < 4 * 256 * 256 // 4, seen.largest


def test_an_activation_module_that_calls_a_functional_gets_the_identity_rule_once(monkeypatch):
    """``nn.GELU`` and BERT's activation call ``F.gelu``, which the rules' mode already ruled;
    the module hook then passes the result on (it applied the rule a second time: the same
    gradient, one more ratio to save and form). The map is unchanged."""
    model = models.bert("sdpa").eval()
    ids = torch.randint(5, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    before = AttnLRP(lambda i: model(i).logits, model).attribute(ids, target=0, output="token")
    rules: list[str] = []
    original = lrp.identity_rule

    def counting(x, y):
        import inspect

        rules.append(inspect.stack()[1].function)
        return original(x, y)

    monkeypatch.setattr(lrp, "identity_rule", counting)
    after = AttnLRP(lambda i: model(i).logits, model).attribute(ids, target=0, output="token")
    assert "hook" not in rules and len(rules) >= 3  # two GELUs and the pooler's tanh, once each
    assert torch.equal(before, after)


def test_the_cheaper_element_wise_rules_keep_their_equations():
    """Identity rule: ``g y / x``, and 0 where ``x == 0`` (GELU's 0/0 and sigmoid's 0.5/0 alike);
    LayerNorm rule: ``w g`` centred, over the standard deviation held constant; epsilon rule:
    ``g z / (z + eps sign z)`` then ``W``. Each against its equation written out in float64."""
    from captum_chefer.core.lrp import identity_rule, layer_norm_rule, linear_rule

    x = torch.tensor([-1.5, 0.0, 0.3, 2.0], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([0.7, -1.1, 0.4, 2.5], dtype=torch.float64)
    for f in (F.gelu, torch.sigmoid):
        (grad,) = torch.autograd.grad(identity_rule(x, f(x)), x, g)
        y = f(x.detach())
        expected = torch.where(x.detach() == 0, 0.0, g * y / x.detach())
        torch.testing.assert_close(grad, expected, rtol=1e-15, atol=0.0)

    generator = torch.Generator().manual_seed(6)
    h = torch.randn(3, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    w, b = (torch.randn(8, dtype=torch.float64, generator=generator) for _ in "wb")
    g = torch.randn(3, 8, dtype=torch.float64, generator=generator)
    (grad,) = torch.autograd.grad(layer_norm_rule(h, (8,), w, b, 1e-5), h, g)
    std = (h.detach().var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    expected = ((g * w) - (g * w).mean(-1, keepdim=True)) / std
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)

    weight = torch.randn(5, 8, dtype=torch.float64, generator=generator)
    bias = torch.randn(5, dtype=torch.float64, generator=generator)
    x3 = torch.randn(2, 3, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    g = torch.randn(2, 3, 5, dtype=torch.float64, generator=generator)
    (grad,) = torch.autograd.grad(linear_rule(x3, weight, bias, 0.1), x3, g)
    z = F.linear(x3.detach(), weight, bias)
    expected = (g * z / (z + 0.1 * z.sign())) @ weight
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
