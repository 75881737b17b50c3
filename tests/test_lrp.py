"""AttnLRP and CP-LRP: the rules against an explicit reference, conservation, scoping, refusals."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch import nn

import captum_chefer
from captum_chefer import CPLRP, AttnLRP
from captum_chefer.capture.lrp import lrp_rules
from tests import models
from tests.reference_lrp import TinyEncoder, reference_relevance

RULES = {"attnlrp": AttnLRP, "cplrp": CPLRP}


def _zero_biases(model: nn.Module) -> nn.Module:
    """Biases, and the constants that act as biases (position, type, CLS/distillation tokens)."""
    names = ("bias", "position", "token_type", "cls_token", "pos_embed", "dist_token", "wpe")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in names):
                parameter.zero_()
    return model


@pytest.mark.parametrize("sdpa", [False, True], ids=["softmax", "sdpa"])
@pytest.mark.parametrize("rule", ["attnlrp", "cplrp"])
def test_matches_explicit_reference(rule: str, sdpa: bool) -> None:
    model = TinyEncoder(sdpa=sdpa).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected, _ = reference_relevance(model, x, target=2, rule=rule, eps=0.05)
    got = RULES[rule](model).attribute(x, target=2, epsilon=0.05)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(got, RULES[rule](model).attribute(x, target=2, epsilon=0.0))


def test_attnlrp_loses_relevance_only_at_the_softmax() -> None:
    """Prop. 3.1: with no biases, input relevance = logit − what the softmax rule absorbs."""
    model = _zero_biases(TinyEncoder()).double().eval()
    x = torch.randn(1, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _, lost = reference_relevance(model, x, target=0, rule="attnlrp", eps=0.0)
    total = AttnLRP(model).attribute(x, target=0, epsilon=0.0).sum()
    logit = model(x)[0, 0]
    assert abs(sum(lost)) > 1e-3 * abs(logit)  # the softmax is not conservative
    torch.testing.assert_close(total + sum(lost), logit, rtol=0, atol=1e-10)


def _hf(config: str, model: str, **settings):
    import transformers

    torch.manual_seed(0)
    sizes = dict(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    built = getattr(transformers, model)(getattr(transformers, config)(**(sizes | settings)))
    return built.eval()


def _timm(name: str, **settings):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, **settings).eval()


FAMILIES = {
    "bert": (models.bert, "ids"),
    "bert-eager": (lambda: models.bert("eager"), "ids"),
    "llama": (models.llama, "ids-last"),
    "llama-eager": (lambda: models.llama("eager"), "ids-last"),
    "vit": (models.vit, "pixels32"),
    "deit-timm": (
        lambda: _timm("deit_tiny_distilled_patch16_224", depth=2, img_size=64),
        "pixels64",
    ),
    # the rest of the sweep: hand-written norms and activations, ALiBi, MHA, windows, RoPE
    "gpt2": (models.gpt2, "ids-last"),
    "bloom": (lambda: _hf("BloomConfig", "BloomForCausalLM", n_head=4), "ids-last"),
    "gemma": (
        lambda: _hf("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=2, head_dim=8),
        "ids-last",
    ),
    "deberta-v2": (lambda: _hf("DebertaV2Config", "DebertaV2ForSequenceClassification"), "ids"),
    "t5-encoder": (
        lambda: _hf("T5Config", "T5EncoderModel", d_model=32, d_ff=64, d_kv=8, num_layers=2,
                    num_heads=4),
        "ids-first",
    ),
    "torch-encoder": (lambda: models.EncoderClassifier().eval(), "embeds"),
    "eva02-timm": (lambda: _timm("eva02_tiny_patch14_224", depth=2, img_size=56), "pixels56"),
    "swin-timm": (
        lambda: _timm("swin_tiny_patch4_window7_224", depths=(1, 1, 1), embed_dim=16,
                      num_heads=(1, 2, 2), img_size=112),
        "pixels112",
    ),
}  # fmt: skip


def _family_call(name: str):
    make, kind = FAMILIES[name]
    model = make()
    generator = torch.Generator().manual_seed(3)
    if kind.startswith("ids"):
        inputs = torch.randint(0, 120, (2, 6), generator=generator)
    elif kind == "embeds":
        inputs = torch.randn(2, 5, 16, generator=generator)
    else:
        side = int(kind.removeprefix("pixels"))
        inputs = torch.randn(1 if side > 64 else 2, 3, side, side, generator=generator)
    if kind == "ids-last":
        return model, inputs, lambda ids: model(ids).logits[:, -1]
    if kind == "ids-first":
        return model, inputs, lambda ids: model(ids).last_hidden_state[:, 0, :3]
    return model, inputs, model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cplrp_conserves_relevance_without_biases(name: str) -> None:
    model, inputs, forward = _family_call(name)
    model = _zero_biases(model).double()
    inputs = inputs.double() if inputs.is_floating_point() else inputs
    relevance = CPLRP(forward, model=model).attribute(inputs, target=1, epsilon=0.0)
    with torch.no_grad():
        out = forward(inputs)
    logit = getattr(out, "logits", out)[:, 1]
    torch.testing.assert_close(relevance.flatten(1).sum(1), logit, rtol=0, atol=1e-5)
    assert relevance.abs().sum() > 10 * logit.abs().sum() * 1e-3  # not a degenerate map
    attn = AttnLRP(forward, model=model).attribute(inputs, target=1, epsilon=0.0)
    assert attn.shape == relevance.shape and torch.isfinite(attn).all()
    assert not torch.allclose(attn, relevance)  # the softmax rule does reach queries and keys


class GatedBlock(nn.Module):
    """Softmax attention, then a SwiGLU MLP ``down(silu(gate(h)) * up(h))``."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qk = nn.Linear(dim, 2 * dim, bias=False)
        self.gate, self.up = nn.Linear(dim, 16, bias=False), nn.Linear(dim, 16, bias=False)
        self.down, self.head = nn.Linear(16, dim, bias=False), nn.Linear(dim, 1, bias=False)

    def forward(self, x, constant: bool = False):
        q, k = self.qk(x).chunk(2, -1)
        probs = torch.softmax(q @ k.transpose(-1, -2), -1)
        h = x + (probs.detach() if constant else probs) @ x
        gate = nn.functional.silu(self.gate(h))
        out = h + self.down((gate.detach() if constant else gate) * self.up(h))
        return self.head(out[:, 0])


def test_cplrp_holds_attention_and_activated_gates_constant() -> None:
    """Against plain autograd on the same model with probabilities and gates detached."""
    model = GatedBlock().double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(leaf, constant=True).sum(), leaf)
    got = CPLRP(model).attribute(x, epsilon=0.0)
    torch.testing.assert_close(got, x * grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.sum((1, 2)), model(x)[:, 0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule", ["attnlrp", "cplrp"])
@pytest.mark.parametrize("name", ["bert", "llama", "vit", "deit-timm"])
def test_forward_is_unchanged_bit_for_bit(name: str, rule: str) -> None:
    model, inputs, forward = _family_call(name)
    with torch.no_grad():
        plain = getattr(forward(inputs), "logits", forward(inputs))
    leaf = inputs.clone().requires_grad_(True) if inputs.is_floating_point() else inputs
    with lrp_rules(model, rule, (leaf,)) as state:
        traced = getattr(forward(leaf), "logits", forward(leaf))
    assert state.attention_calls > 0
    assert torch.equal(traced.detach(), plain)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_nothing_remains_after_the_call_or_an_error() -> None:
    model = models.bert()
    ids = torch.randint(0, 120, (2, 6))
    hooks, flags = _hook_count(model), [p.requires_grad for p in model.parameters()]

    def failing(ids):
        model(ids)
        raise ValueError("boom")

    AttnLRP(model).attribute(ids, target=0)
    with pytest.raises(ValueError, match="boom"):
        CPLRP(failing, model=model).attribute(ids, target=0)
    assert not torch.overrides._get_current_function_mode_stack()
    assert _hook_count(model) == hooks
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_other_threads_are_untouched() -> None:
    """A plain forward/backward on another thread, run while the rules are active here."""
    model = models.bert()
    embeds = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(4))

    def plain_gradient() -> torch.Tensor:
        x = embeds.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(inputs_embeds=x).logits[0, 1], x)
        return grad

    expected = plain_gradient()
    seen: list[torch.Tensor] = []

    def forward(ids):
        worker = threading.Thread(target=lambda: seen.append(plain_gradient()))
        worker.start()
        worker.join()
        return model(ids).logits

    AttnLRP(forward, model=model).attribute(torch.randint(0, 120, (1, 6)), target=1)
    assert len(seen) == 1 and torch.equal(seen[0], expected)


@pytest.mark.parametrize("rule", ["attnlrp", "cplrp"])
def test_ids_embeddings_and_tokens_agree(rule: str) -> None:
    model = models.bert()
    ids = torch.randint(0, 120, (2, 6), generator=torch.Generator().manual_seed(5))
    method = RULES[rule](model)
    on_ids = method.attribute(ids, target=1)
    on_tokens = method.attribute(ids, target=1, output="token")
    embeds = model.get_input_embeddings()(ids).detach()

    def from_embeddings(x):
        return model(inputs_embeds=x).logits

    on_embeds = RULES[rule](from_embeddings, model=model).attribute(embeds, target=1)
    assert on_ids.shape == (2, 6) and on_embeds.shape == (2, 6, 32)
    torch.testing.assert_close(on_ids, on_embeds.sum(-1))
    torch.testing.assert_close(on_ids, on_tokens)


def test_padding_gets_zero_and_leaves_real_tokens_unchanged() -> None:
    model = models.bert()
    ids = torch.randint(1, 120, (1, 5), generator=torch.Generator().manual_seed(6))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 5), torch.zeros(1, 3)], 1).long()
    alone = CPLRP(model).attribute(ids, target=2)
    batch = CPLRP(model).attribute(
        (padded.repeat(2, 1),), target=[2, 2], additional_forward_args=(mask.repeat(2, 1),)
    )
    assert isinstance(batch, tuple)
    assert torch.equal(batch[0][:, 5:], torch.zeros(2, 3))
    torch.testing.assert_close(batch[0][:, :5], alone.repeat(2, 1), rtol=1e-4, atol=1e-6)


def test_patch_tokens_read_at_the_token_layer() -> None:
    """The patch convolution is linear: without its bias, each token's relevance is its
    patch's pixel relevance."""
    model = _timm("vit_tiny_patch16_224", depth=2, img_size=64)
    with torch.no_grad():
        model.patch_embed.proj.bias.zero_()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    tokens = CPLRP(model).attribute(pixels, target=0, output="token")
    on_pixels = CPLRP(model).attribute(pixels, target=0)
    assert tokens.shape == (2, 16)
    per_patch = on_pixels.sum(1).unfold(1, 16, 16).unfold(2, 16, 16).sum((-1, -2)).flatten(1)
    torch.testing.assert_close(per_patch, tokens, rtol=1e-4, atol=1e-6)


class NoAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def forward(self, x):
        return self.layer(x).sum(1)


class DividesByInput(nn.Module):
    def forward(self, x):
        q = k = x
        scores = torch.softmax(q @ k.transpose(-1, -2), -1) @ x
        return (scores / x.sum(-1, keepdim=True)).sum((1, 2)).unsqueeze(1)


def test_refusals_name_the_cause_and_the_fix() -> None:
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="saw no attention.*attn_implementation"):
        AttnLRP(NoAttention().eval()).attribute(x, target=0)
    with pytest.raises(RuntimeError, match="no rule for a division.*CheferRelevance"):
        AttnLRP(DividesByInput().eval()).attribute(x)
    with pytest.raises(ValueError, match="Pass layer="):
        CPLRP(DividesByInput().eval()).attribute(x, output="token")
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        CPLRP(models.EncoderClassifier().eval()).attribute(
            torch.randn(1, 4, 16), target=0, epsilon=-1
        )
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside it"):
        CPLRP(models.EncoderClassifier().eval()).attribute(torch.randn(1, 4, 16), target=0)
    with torch.no_grad():
        CPLRP(models.EncoderClassifier().eval()).attribute(torch.randn(1, 4, 16), target=0)
    trained = models.EncoderClassifier()
    trained.encoder.layers[0].self_attn.dropout = 0.5
    with pytest.raises(RuntimeError, match="model.eval"), pytest.warns(UserWarning):
        AttnLRP(trained.train()).attribute(torch.randn(1, 4, 16), target=0)


def test_training_mode_is_judged_by_the_wrapped_model() -> None:
    model = models.EncoderClassifier().eval()
    wrapper = nn.Sequential(model)  # left in training mode, as wrappers often are
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CPLRP(wrapper).attribute(torch.randn(1, 4, 16), target=0)
    with pytest.warns(UserWarning, match="training mode"):
        CPLRP(nn.Sequential(model.train())).attribute(torch.randn(1, 4, 16), target=0)


def test_exported_and_conventions() -> None:
    assert captum_chefer.AttnLRP is AttnLRP and "CPLRP" in captum_chefer.__all__
    model = models.EncoderClassifier().eval()
    x = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(8))
    single = AttnLRP(model).attribute(x, target=torch.tensor([0, 1, 2]))
    (as_tuple,) = AttnLRP(model).attribute((x,), target=torch.tensor([0, 1, 2]))
    assert torch.equal(single, as_tuple) and single.shape == x.shape
    per_example = torch.stack(
        [AttnLRP(model).attribute(x[i : i + 1], target=i)[0] for i in range(3)]
    )
    torch.testing.assert_close(single, per_example)


class InPlaceAfterLinear(nn.Module):
    """Attention whose projection output the model then changes in place (``h += …``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(4, 12)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.qkv(x)
        h += 0.5  # in place, on the linear layer's output
        q, k, v = h.chunk(3, -1)
        out = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return self.head(out[:, 0])


def test_in_place_change_of_a_linear_output_is_named_and_epsilon_zero_works() -> None:
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(9))
    model = InPlaceAfterLinear().eval()
    with pytest.raises(RuntimeError, match="in place.*Pass epsilon=0"):
        AttnLRP(model).attribute(x, target=0)
    lrp0 = AttnLRP(model).attribute(x, target=0, epsilon=0.0)
    assert lrp0.shape == x.shape and torch.isfinite(lrp0).all()

    # LRP-0 on a model whose linear outputs are left alone gives the same map with or without
    # the in-place step being a separate addition.
    class OutOfPlace(InPlaceAfterLinear):
        def forward(self, x):
            q, k, v = (self.qkv(x) + 0.5).chunk(3, -1)
            return self.head((torch.softmax(q @ k.transpose(-1, -2), -1) @ v)[:, 0])

    same = OutOfPlace().eval()
    same.load_state_dict(model.state_dict())
    torch.testing.assert_close(lrp0, AttnLRP(same).attribute(x, target=0, epsilon=0.0))


class ScalesEmbeddingsInPlace(nn.Module):
    """Token ids → embeddings scaled in place (as CTRL does) → one attention → a class."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 4)
        self.head = nn.Linear(4, 2)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, ids):
        x = self.embed(ids)
        x *= 2.0
        out = torch.softmax(x @ x.transpose(-1, -2), -1) @ x
        return self.head(out[:, 0])


@pytest.mark.parametrize("output", ["input", "token"])
def test_embeddings_changed_in_place_are_read(output: str) -> None:
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(10))
    model = ScalesEmbeddingsInPlace().eval()
    relevance = CPLRP(model).attribute(ids, target=1, output=output)
    assert relevance.shape == (2, 5) and torch.isfinite(relevance).all()
    assert relevance.abs().sum() > 0
