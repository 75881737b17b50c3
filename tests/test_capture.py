"""Trustworthy capture: every thread, every way attention is called, and loud refusals."""

from __future__ import annotations

import copy
import math
import threading
import warnings

import models
import pytest
import torch
import torch.nn.functional as F
from reference import assert_close, one_hot_rows, read_rows, relevance_matrix
from torch import nn
from torch.nn.functional import scaled_dot_product_attention as bound_sdpa

from captum_chefer import (
    CPLRP,
    AttentionGradCAM,
    AttentionRollout,
    AttnLRP,
    CheferRelevance,
    CheferSingleStream,
    GradientRollout,
    RawAttention,
)
from captum_chefer.capture import Recorder
from captum_chefer.core.attention import AttentionCall


def _ids(batch=2, size=7, seed=3):
    return torch.randint(3, 120, (batch, size), generator=torch.Generator().manual_seed(seed))


def _bert_explainer(model):
    return CheferRelevance(lambda ids, mask: model(ids, attention_mask=mask).logits, model)


def _no_capture_left():
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert torch._C._len_torch_function_stack() == 0
    assert torch.backends.mha.get_fastpath_enabled()


class BoundSdpaModel(nn.Module):
    """Attention through a name bound at import, 3-D single-head or 4-D multi-head calls."""

    def __init__(self, heads: int, dim: int = 16, layers: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.embed = nn.Embedding(50, dim)
        self.qkv = nn.ModuleList([nn.Linear(dim, 3 * dim) for _ in range(layers)])
        self.head = nn.Linear(dim, 3)
        self.keep: list[torch.Tensor] | None = None

    def attend(self, q, k, v):
        if self.keep is None:
            return bound_sdpa(q, k, v)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        attn.retain_grad()
        self.keep.append(attn)
        return attn @ v

    def forward(self, ids):
        x = self.embed(ids)
        batch, size, dim = x.shape
        for qkv in self.qkv:
            q, k, v = qkv(x).chunk(3, -1)
            if self.heads > 1:
                q, k, v = (
                    t.reshape(batch, size, self.heads, -1).transpose(1, 2) for t in (q, k, v)
                )
            out = self.attend(q, k, v)
            if self.heads > 1:
                out = out.transpose(1, 2).reshape(batch, size, dim)
            x = torch.tanh(x + out)
        return self.head(x[:, 0])


@pytest.mark.parametrize("heads", [1, 4], ids=["3-D single head", "4-D"])
def test_sdpa_bound_at_import_and_3d_calls_are_captured_exactly(heads):
    model = BoundSdpaModel(heads).eval()
    ids = _ids(seed=4) % 50
    ours = CheferRelevance(model).attribute(ids, target=1, output="token")
    reference = copy.deepcopy(model).double()
    reference.keep = []
    reference(ids)[:, 1].sum().backward()
    maps = [a.detach() if a.dim() == 4 else a.detach()[:, None] for a in reference.keep]
    grads = [a.grad if a.dim() == 4 else a.grad[:, None] for a in reference.keep]
    expected = read_rows(relevance_matrix(maps, grads), one_hot_rows([0, 0], 7))
    assert_close(ours, expected)


def test_threads_attributing_at_once_get_the_sequential_results():
    models_and_inputs = [
        (models.bert("sdpa"), _ids(seed=5)),
        (models.bert("eager"), _ids(seed=6)),
    ]
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    expected = [
        [_bert_explainer(m).attribute(ids, t, (mask,)) for t in range(3)]
        for m, ids in models_and_inputs
    ]
    plain = [m(ids, attention_mask=mask).logits.detach() for m, ids in models_and_inputs]
    failures: list[str] = []
    barrier = threading.Barrier(5)

    def attribute(which: int, target: int) -> None:
        model, ids = models_and_inputs[which]
        barrier.wait()
        for _ in range(4):
            result = _bert_explainer(model).attribute(ids, target, (mask,))
            if not torch.equal(result, expected[which][target]):
                failures.append(f"model {which}, target {target}: differs from sequential")

    def plain_forward() -> None:
        barrier.wait()
        for _ in range(8):
            for (model, ids), logits in zip(models_and_inputs, plain):
                with torch.no_grad():
                    if not torch.equal(model(ids, attention_mask=mask).logits, logits):
                        failures.append("a plain forward on another thread changed")

    threads = [threading.Thread(target=attribute, args=(i % 2, i % 3)) for i in range(4)]
    threads.append(threading.Thread(target=plain_forward))
    errors: list[BaseException] = []

    def run(thread_target):
        def wrapped(*args):
            try:
                thread_target(*args)
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        return wrapped

    for thread in threads:
        thread._target = run(thread._target)  # type: ignore[attr-defined]
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert not failures, failures
    _no_capture_left()
    for model, _ in models_and_inputs:
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_multihead_attention_on_threads_leaves_no_wrapper():
    model = models.EncoderClassifier().eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    expected = CheferRelevance(model).attribute(x, 0)
    results: list[torch.Tensor] = []
    threads = [
        threading.Thread(target=lambda: results.append(CheferRelevance(model).attribute(x, 0)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(torch.equal(r, expected) for r in results)
    assert all("forward" not in m.__dict__ for m in model.modules())
    _no_capture_left()


def _siamese_reference(model, a, b, branch):
    """The map of ``branch`` (0: ``a``, 1: ``b``) of ``cos(model(a), model(b))``, from the maps
    and gradients of that branch's pass through every block, in float64."""
    reference = copy.deepcopy(model).double()
    for block in reference.blocks:
        block.keep = []
    F.cosine_similarity(reference(a), reference(b)).sum().backward()
    assert all(len(block.keep) == 2 for block in reference.blocks)  # both branches ran
    maps = [block.keep[branch] for block in reference.blocks]
    expected = relevance_matrix([m.detach() for m in maps], [m.grad for m in maps])
    return read_rows(expected, one_hot_rows([0, 0], 7))


def test_siamese_forward_reads_each_input_through_its_own_branch():
    """cos(model(a), model(b)) runs the layers twice: two independent towers, each fed by one
    input, each read at its own output row (the old code refused it)."""
    model = models.HandModel().eval()
    a, b = _ids(seed=7) % 50, _ids(seed=8) % 50

    def siamese(x, y):
        return F.cosine_similarity(model(x), model(y))[:, None]

    ours_a, ours_b = CheferRelevance(siamese, model).attribute((a, b), output="token")
    assert_close(ours_a, _siamese_reference(model, a, b, 0))
    assert_close(ours_b, _siamese_reference(model, a, b, 1))
    detached = CheferRelevance(
        lambda x: F.cosine_similarity(model(x), model(b).detach())[:, None], model
    )
    assert torch.equal(detached.attribute(a, output="token"), ours_a)


def test_read_out_from_an_earlier_layer_uses_the_layers_it_depends_on():
    model = models.bert("eager")
    ids = _ids(seed=9)

    def early(ids):
        return model(ids, output_hidden_states=True).hidden_states[2][:, 0, :3]

    raw = RawAttention(early, model).attribute(ids, 0, output="token", self_relevance="keep")
    reference = copy.deepcopy(model).double()
    output = reference(ids, output_attentions=True, output_hidden_states=True)
    assert_close(raw, output.attentions[1][:, :, 0].mean(1))
    cam = AttentionGradCAM(early, model).attribute(ids, 0, output="token")
    assert cam.shape == (2, 7)
    attentions = list(output.attentions[:2])
    for attention in attentions:
        attention.retain_grad()
    output.hidden_states[2][:, 0, 0].sum().backward()
    expected = read_rows(
        relevance_matrix([a.detach() for a in attentions], [a.grad for a in attentions]),
        one_hot_rows([0, 0], 7),
    )
    assert_close(CheferRelevance(early, model).attribute(ids, 0, output="token"), expected)


def test_training_mode_with_a_padded_batch_runs_and_warns():
    model = models.bert("sdpa").train()
    ids, mask = _ids(seed=10), torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    with pytest.warns(UserWarning, match="training mode: dropout was applied"):
        relevance = _bert_explainer(model).attribute(ids, 0, (mask,))
    assert (relevance[1, 4:] == 0).all() and torch.isfinite(relevance).all()
    assert model.training


def test_wrapper_in_training_mode_over_an_eval_model_does_not_warn(recwarn):
    model = models.bert("sdpa")
    wrapper = nn.DataParallel(model).train()
    model.eval()
    ids = _ids(seed=11)
    ours = CheferRelevance(lambda i: wrapper(i).logits, wrapper).attribute(ids, 1)
    assert_close(ours, CheferRelevance(lambda i: model(i).logits, model).attribute(ids, 1))
    assert not [w for w in recwarn if "training mode" in str(w.message)]


def test_compiled_model_is_explained_through_its_original_module():
    model = models.EncoderClassifier().eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model)
    assert_close(CheferRelevance(compiled).attribute(x, 1), CheferRelevance(model).attribute(x, 1))


def test_inference_mode_is_named():
    model = models.EncoderClassifier().eval()
    x = torch.randn(2, 5, 16)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        CheferRelevance(model).attribute(x, 0)
    with torch.inference_mode():
        frozen = torch.randn(2, 5, 16)
    with pytest.raises(RuntimeError, match="inference_mode"):
        CheferRelevance(model).attribute(frozen, 0)


def test_bad_inputs_are_refused_not_clamped_or_zeroed():
    model = models.bert("sdpa")
    explainer = _bert_explainer(model)
    ids, mask = _ids(seed=12), torch.ones(2, 7, dtype=torch.long)
    with pytest.raises(IndexError, match="outside the 7 tokens"):
        explainer.attribute(ids, 0, (mask,), token_index=7)
    with pytest.raises(IndexError, match="outside"):
        explainer.attribute(ids, 0, (mask,), token_index=torch.tensor([0, -8]))
    padded = mask.clone()
    padded[1, 3:] = 0
    with pytest.raises(ValueError, match=r"reads token 5 in example 1, which the explained"):
        explainer.attribute(ids, 0, (padded,), token_index=5)
    single = ids[:, :1]
    with pytest.raises(ValueError, match="they are every token"):
        explainer.attribute(single, 0, (mask[:, :1],), self_relevance="zero")


def test_int_target_on_a_multi_value_output_is_refused():
    model = models.bert("sdpa")
    explainer = CheferRelevance(lambda ids: model(ids).logits[:, None].expand(-1, 2, -1), model)
    with pytest.raises(ValueError, match="not one value per example"):
        explainer.attribute(_ids(seed=13), target=1)
    ok = explainer.attribute(_ids(seed=13), target=(0, 1))
    assert_close(
        ok, CheferRelevance(lambda ids: model(ids).logits, model).attribute(_ids(seed=13), 1)
    )


def test_unseen_kernel_is_refused_and_the_suggested_switch_works():
    model = models.bert("sdpa")
    ids = _ids(seed=14)
    expected = CheferRelevance(lambda i: model(i).logits, model).attribute(ids, 2)
    model.config._attn_implementation_internal = "flash_attention_2"
    explainer = CheferRelevance(lambda i: model(i).logits, model)
    with pytest.raises(RuntimeError, match=r"set_attn_implementation\('sdpa'\)"):
        explainer.attribute(ids, 2)
    model.set_attn_implementation("sdpa")
    assert_close(explainer.attribute(ids, 2), expected)


def test_falcon_with_alibi_is_explained_as_loaded_at_eager():
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    config = FalconConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        alibi=True,
        attn_implementation="eager",
    )
    model = FalconForCausalLM(config).eval()
    ids = _ids(seed=15)
    ours = CheferRelevance(lambda i: model(i).logits[:, -1], model).attribute(ids, 5)
    reference = copy.deepcopy(model).double()
    output = reference(ids, output_attentions=True)
    attentions = list(output.attentions)
    for attention in attentions:
        attention.retain_grad()
    output.logits[:, -1, 5].sum().backward()
    maps = [a.detach() for a in attentions]
    expected = read_rows(
        relevance_matrix(maps, [a.grad for a in attentions]), one_hot_rows([6, 6], 7)
    )
    assert_close(ours, expected)


def test_a_layer_on_each_device_keeps_its_own_anchor():
    recorder = Recorder()
    for device in ("cpu", "meta"):
        q = torch.randn(1, 1, 2, 4, device=device, requires_grad=True)
        call = AttentionCall(q, q, q, None, False, 0.5)
        recorder.attention(F.scaled_dot_product_attention, call, {})
    anchors = recorder.anchors
    assert sorted(str(d) for d in anchors) == ["cpu", "meta"]
    assert all(a.requires_grad and a.is_leaf for a in anchors.values())


def _tiny_swin():
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(0)
    config = SwinConfig(
        image_size=16, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=2
    )
    return SwinForImageClassification(config).eval()


def _timm(name, **kwargs):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()


@pytest.mark.parametrize(
    ("build", "size", "cause"),
    [
        (_tiny_swin, 16, "windowed attention"),
        (
            lambda: _timm(
                "swin_tiny_patch4_window7_224", depths=(1, 1), num_heads=(2, 2), embed_dim=16
            ),
            224,
            "windowed attention",
        ),
        (lambda: _timm("xcit_nano_12_p16_224", depth=1), 224, "channel attention"),
        (lambda: _timm("cait_xxs24_224", depth=1, depth_token_only=1), 224, "class attention"),
    ],
    ids=["hf swin", "timm swin", "timm xcit", "timm cait"],
)
def test_attention_the_rule_does_not_define_is_refused_by_name(build, size, cause):
    """The refusal leads with the cause, names only the fix that applies (not the CLIP or
    T5Gemma fixes of other families), in about 400 characters (the Swin refusal was 900)."""
    model = build()
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    forward = (lambda x: model(x).logits) if hasattr(model, "config") else model
    with pytest.raises(ValueError, match=cause) as error:
        CheferRelevance(forward, model).attribute(pixels, 1)
    message = str(error.value)
    assert len(message) <= 450, message
    assert "AttnLRP(model)" in message
    assert not any(other in message for other in ("CLIP", "T5Gemma", "CheferDualEncoder"))


def test_siglip_probe_head_is_refused_and_the_dual_encoder_fix_works():
    from transformers import SiglipConfig, SiglipModel

    from captum_chefer import CheferDualEncoder

    torch.manual_seed(0)
    tower = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config = SiglipConfig(
        text_config=dict(vocab_size=50, **tower),
        vision_config=dict(image_size=16, patch_size=8, **tower),
    )
    model = SiglipModel(config).eval()
    images, ids = torch.randn(2, 3, 16, 16), torch.randint(3, 50, (2, 5))
    vision = lambda x: model.vision_model(x).pooler_output[:, :3]  # noqa: E731
    with pytest.raises(ValueError, match="CheferDualEncoder"):
        CheferRelevance(vision, model.vision_model).attribute(images, 0)
    image_map, text = CheferDualEncoder(model).attribute((images, ids))
    assert image_map.shape == (2, 3, 16, 16) and text.shape == (2, 5)
    assert torch.isfinite(image_map).all() and image_map.abs().sum() > 0


class WeightsInTraining(nn.Module):
    """``nn.MultiheadAttention`` with attention dropout, asked for its weights (the default)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, weights = self.attn(x, x, x)
        return self.head(out[:, 0]) + weights.sum((1, 2))[:, None]


def test_multihead_weights_are_returned_in_training_with_dropout():
    model = WeightsInTraining().train()
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match="dropout was applied"):
        relevance = CheferRelevance(model).attribute(x, target=0)
    assert relevance.shape == x.shape and torch.isfinite(relevance).all()


class ConvMixModel(nn.Module):
    """Attention layers, each followed by a depthwise convolution over the tokens (a hybrid),
    after a convolution stem that makes the tokens. ``kernel=1`` mixes no tokens. With
    ``regions`` ``(B, R, 8)`` it is a single-stream model over text and regions."""

    def __init__(self, kernel: int, dim: int = 16, layers: int = 2, on_keys: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, dim)
        self.stem = nn.Conv1d(dim, dim, 3, padding=1)
        self.qkv = nn.ModuleList([nn.Linear(dim, 3 * dim) for _ in range(layers)])
        self.mix = nn.ModuleList(
            [nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim) for _ in range(layers)]
        )
        self.head = nn.Linear(dim, 3)
        self.regions = nn.Linear(8, dim)
        self.on_keys = on_keys
        self.keep: list[torch.Tensor] | None = None

    def forward(self, ids, regions=None):
        x = self.embed(ids)
        if regions is not None:
            x = torch.cat([x, self.regions(regions)], 1)
        x = x + self.stem(x.transpose(1, 2)).transpose(1, 2)
        for qkv, mix in zip(self.qkv, self.mix):
            q, k, v = qkv(x).chunk(3, -1)
            if self.on_keys:  # mixing that shapes the scores only
                k = k + mix(k.transpose(1, 2)).transpose(1, 2)
            q, k, v = (t.unsqueeze(1) for t in (q, k, v))
            attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
            if self.keep is not None:
                attn.retain_grad()
                self.keep.append(attn)
            x = torch.tanh(x + (attn @ v).squeeze(1))
            if not self.on_keys:
                x = x + mix(x.transpose(1, 2)).transpose(1, 2)
        return self.head(x[:, 0])


@pytest.mark.parametrize(
    "model",
    [ConvMixModel(kernel=1), ConvMixModel(kernel=3, on_keys=True)],
    ids=["kernel 1", "convolution on the keys"],
)
def test_mixing_that_makes_the_tokens_or_shapes_the_scores_is_explained_exactly(model):
    model = model.eval()
    ids = _ids(seed=8) % 50
    ours = CheferRelevance(model).attribute(ids, target=1, output="token")
    reference = copy.deepcopy(model).double()
    reference.keep = []
    reference(ids)[:, 1].sum().backward()
    maps = [a.detach() for a in reference.keep]
    expected = read_rows(
        relevance_matrix(maps, [a.grad for a in reference.keep]), one_hot_rows([0, 0], 7)
    )
    assert_close(ours, expected)


@pytest.mark.parametrize("method", [CheferRelevance, AttentionRollout, GradientRollout])
def test_token_mixing_between_attention_layers_is_refused_by_name(method):
    model = ConvMixModel(kernel=3).eval()
    ids = _ids(seed=8) % 50
    with pytest.raises(
        ValueError,
        match=r"token mixing outside attention \(conv1d with kernel "
        r"\(3,\) in mix\.0 \(Conv1d\); conv1d with kernel \(3,\) in mix\.1",
    ) as error:
        method(model).attribute(ids, target=1)
    assert "AttnLRP(model)" in str(error.value)
    _no_capture_left()


@pytest.mark.parametrize("kernel", [1, 3])
def test_token_mixing_is_refused_for_a_multimodal_stream_too(kernel):
    model = ConvMixModel(kernel).eval()
    inputs = (_ids(seed=8) % 50, torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(8)))
    explainer = CheferSingleStream(model)
    if kernel == 1:
        text, regions = explainer.attribute(inputs, target=1)
        assert text.shape == (2, 7) and regions.shape == (2, 3, 8)
        return
    with pytest.raises(ValueError, match=r"token mixing outside attention \(conv1d"):
        explainer.attribute(inputs, target=1)


def test_token_mixing_refusal_names_a_fix_that_works():
    model = ConvMixModel(kernel=3).eval()
    ids = _ids(seed=8) % 50
    relevance = AttnLRP(model).attribute(ids, target=1, output="token", layer=model.embed)
    assert relevance.shape == (2, 7)
    assert bool(torch.isfinite(relevance).all()) and bool((relevance != 0).all())


def test_layers_read_alone_are_not_refused_for_token_mixing():
    """A convolution after the last attention layer spreads the output over rows 0 and 1 of
    that layer: "auto" cannot read one row and says so; the row asked for is read."""
    model = ConvMixModel(kernel=3).eval()
    ids = _ids(seed=8) % 50
    with pytest.raises(ValueError, match=r"final states of tokens \[0, 1\]"):
        RawAttention(model).attribute(ids, target=1)
    raw = RawAttention(model).attribute(
        ids, target=1, output="token", self_relevance="keep", token_index=0
    )
    reference = copy.deepcopy(model)
    reference.keep = []
    reference(ids)
    assert_close(raw, reference.keep[-1].detach()[:, 0, 0])
    cam = AttentionGradCAM(model).attribute(ids, target=1, output="token", token_index=0)
    assert cam.shape == (2, 7) and bool(torch.isfinite(cam).all())


def test_audio_positional_convolution_makes_the_tokens_and_is_explained_exactly():
    from reference import hf_eager_attentions
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_kernel=(10, 3),
        conv_stride=(5, 2),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
        num_labels=3,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.0,
    )
    model = Wav2Vec2ForSequenceClassification(config).eval()
    audio = torch.randn(2, 160, generator=torch.Generator().manual_seed(9))
    ours = CheferRelevance(model).attribute(audio, target=1, output="token", token_index=0)
    maps, grads = hf_eager_attentions(model, lambda out: out.logits[:, 1], input_values=audio)
    assert_close(ours, read_rows(relevance_matrix(maps, grads), one_hot_rows([0, 0], 15)))


class AttentionPoolModel(nn.Module):
    """One attention layer, then an attention-pooling head: a softmax over the tokens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.score = nn.Linear(16, 1)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        x = self.layer(self.embed(ids))
        weights = torch.softmax(self.score(x), dim=1)  # (B, N, 1)
        return self.head((weights * x).sum(1))


def test_attention_pooling_is_refused_and_the_named_fixes_work():
    from captum.attr import LayerIntegratedGradients

    model = AttentionPoolModel().eval()
    ids = _ids(seed=10) % 50
    with pytest.raises(ValueError, match=r"softmax over dim 1 of \(2, 7, 1\)") as error:
        CheferRelevance(model).attribute(ids, target=1)
    message = str(error.value)
    assert "AttnLRP(model)" in message and "LayerIntegratedGradients" in message
    relevance = AttnLRP(model).attribute(ids, target=1, output="token", layer=model.embed)
    assert relevance.shape == (2, 7) and bool(torch.isfinite(relevance).all())
    integrated = LayerIntegratedGradients(model, model.embed)
    maps, delta = integrated.attribute(ids, target=1, return_convergence_delta=True, n_steps=64)
    # Completeness, against an independent quantity: the attributions sum to f(x) - f(baseline).
    with torch.no_grad():
        gap = model(ids)[:, 1] - model(torch.zeros_like(ids))[:, 1]
    assert torch.allclose(maps.sum((1, 2)), gap, atol=1e-2)
    _no_capture_left()


def test_a_softmax_off_the_explained_path_is_not_refused():
    model = AttentionPoolModel().eval()
    ids = _ids(seed=10) % 50

    def forward(ids):  # the pooled branch is computed but not explained
        x = model.layer(model.embed(ids))
        torch.softmax(model.score(x), dim=1)
        return model.head(x[:, 0])

    row = CheferRelevance(forward, model).attribute(ids, target=1, output="token")
    assert row.shape == (2, 7) and bool(torch.isfinite(row).all())


def test_hf_hybrid_with_short_convolutions_is_refused_and_attnlrp_explains_it():
    from transformers import Lfm2Config, Lfm2ForCausalLM

    torch.manual_seed(0)
    config = Lfm2Config(
        vocab_size=60,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        layer_types=["full_attention", "conv"],
        max_position_embeddings=32,
    )
    model = Lfm2ForCausalLM(config).eval()
    ids = _ids(size=6, seed=11) % 60

    def forward(ids):
        return model(ids).logits[:, -1]

    with pytest.raises(ValueError, match=r"conv1d with kernel \(3,\) in model\.layers\.1\.conv "):
        CheferRelevance(forward, model).attribute(ids, target=1)
    relevance = AttnLRP(forward, model).attribute(ids, target=1, output="token")
    assert relevance.shape == (2, 6) and bool(torch.isfinite(relevance).all())
    assert bool((relevance != 0).any())


class _LibraryFunc(nn.Module):
    """A module a library makes around a function (as the ``kernels`` package's ``Func``), not
    part of the user's model: transformers' hub-kernel fallback runs a convolution inside one."""

    def forward(self, x, weight):
        return F.conv1d(x, weight, padding=1, groups=x.shape[1])


_LIBRARY_CONV = _LibraryFunc()


class _ConvThroughALibrary(nn.Conv1d):
    def forward(self, x):
        return _LIBRARY_CONV(x, self.weight)


class ConvThroughALibrary(nn.Module):
    """One attention layer, then a depthwise convolution run through a library's module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mixer = nn.ModuleDict({"conv": _ConvThroughALibrary(8, 8, 3, groups=8)})
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        x = self.embed(ids)
        x = x + self.attention(x, x, x, need_weights=False)[0]
        x = self.mixer["conv"](x.transpose(1, 2)).transpose(1, 2)
        return self.head(x[:, -1])


def test_token_mixing_is_named_by_the_users_module_when_a_library_module_runs_it():
    """The refusal names ``mixer.conv``, the innermost module of the model on the stack, not the
    library's module (``_LibraryFunc``) the convolution ran in."""
    model = ConvThroughALibrary().eval()
    named = r"conv1d with kernel \(3,\) in mixer\.conv \(_ConvThroughALibrary\)"
    with pytest.raises(ValueError, match=named):
        CheferRelevance(model).attribute(_ids(seed=4) % 50, target=0)


def test_attention_in_a_layout_it_cannot_read_is_named_when_nothing_else_is_captured():
    class ColumnSoftmax(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(50, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, ids):
            x = self.embed(ids)  # attention normalised over the queries: (B, 1, N, N), dim 2
            attn = torch.softmax((x @ x.transpose(-1, -2)).unsqueeze(1), dim=2)
            return self.head((attn.squeeze(1) @ x)[:, 0])

    with pytest.raises(ValueError, match=r"softmax over dim 2 of \(2, 1, 7, 7\)"):
        CheferRelevance(ColumnSoftmax().eval()).attribute(_ids(seed=12) % 50, target=1)


class MixerLayers(nn.Module):
    """A layer stack whose layers are softmax attention or another token mixer: linear
    attention (``K^T V``, as ``matmul`` or ``einsum``), a time shift (``F.pad``,
    ``torch.roll`` or ``torch.cat`` of a slice), or ``"none"`` (a per-token MLP, which mixes
    nothing). ``pool`` ends it with a softmax over the tokens as (B, N) and a weighted sum;
    ``classes`` ends it with a softmax over the classes (as many as tokens)."""

    def __init__(self, kinds: tuple[str, ...], pool: bool = False, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.kinds = kinds
        self.layers = nn.ModuleList([nn.Linear(16, 48) for _ in kinds])
        self.score = nn.Linear(16, 1)
        self.pool = pool
        self.head = nn.Linear(16, classes)

    def forward(self, ids):
        x = self.embed(ids)
        for kind, layer in zip(self.kinds, self.layers):
            q, k, v = layer(x).chunk(3, -1)
            q, k, v = (t.unflatten(-1, (2, 8)).transpose(1, 2) for t in (q, k, v))
            if kind == "attention":
                attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
                mixed = attn @ v
            elif kind == "linear":
                mixed = F.elu(q) @ (F.elu(k).transpose(-1, -2) @ v) / q.shape[2]
            elif kind == "einsum":
                state = torch.einsum("bhnd,bhne->bhde", F.elu(k), v)
                mixed = torch.einsum("bhnd,bhde->bhne", F.elu(q), state) / q.shape[2]
            elif kind == "pad":
                mixed = F.pad(v, (0, 0, 1, -1))
            elif kind == "roll":
                mixed = torch.roll(v, 1, dims=2)
            elif kind == "cat":  # half of each value from the previous token, as in ZAYA
                mixed = torch.cat(
                    [v, torch.cat([torch.zeros_like(v[:, :, :1]), v[:, :, :-1]], 2)], -1
                )
                mixed = mixed[..., :8] + mixed[..., 8:]
            else:
                mixed = torch.tanh(v)
            x = x + mixed.transpose(1, 2).flatten(2)
        if self.pool:
            weights = torch.softmax(self.score(x).squeeze(-1), dim=-1)  # (B, N)
            return self.head((weights[..., None] * x).sum(1))
        return torch.softmax(self.head(x[:, 0]), -1)


def _pooled_reference(model, ids, weights):
    """Rows of R (float64, from the softmaxes' own gradients) weighted by ``weights`` (N,),
    minus the identity's share: the map of a read over those tokens."""
    keep: list[torch.Tensor] = []
    original = torch.softmax

    def softmax(scores, dim):
        probs = original(scores, dim)
        if probs.dim() == 4:  # attention, not a softmax over the classes
            probs.retain_grad()
            keep.append(probs)
        return probs

    reference = copy.deepcopy(model).double()
    torch.softmax = softmax
    try:
        reference(ids)[:, 1].sum().backward()
    finally:
        torch.softmax = original
    relevance = relevance_matrix([a.detach() for a in keep], [a.grad for a in keep])
    weights = weights.double()
    return torch.einsum("n,bnk->bk", weights, relevance) - weights


@pytest.mark.parametrize(
    ("kinds", "named"),
    [
        (
            ("attention", "linear"),
            r"matmul over an axis of size 7, matmul over an axis of size 8 in MixerLayers",
        ),
        (
            ("linear", "attention"),
            r"matmul over an axis of size 7, matmul over an axis of size 8 in MixerLayers",
        ),
        (("attention", "einsum"), r"einsum bhnd,bhne->bhde over an axis of size 7"),
        (("attention", "pad"), r"pad shifting dim 2 by 1"),
        (("attention", "roll"), r"roll over dim 2"),
        (("attention", "cat"), r"cat shifting dim 2 by 1"),
    ],
)
@pytest.mark.parametrize("given", [True, False], ids=["model given", "forward only"])
def test_linear_attention_and_token_shifts_are_refused_by_name(kinds, named, given):
    model = MixerLayers(kinds).eval()
    ids = _ids(seed=12) % 50
    explainer = CheferRelevance(model) if given else CheferRelevance(lambda ids: model(ids))
    with pytest.raises(ValueError, match=r"token mixing outside attention \(" + named) as error:
        explainer.attribute(ids, target=1)
    assert "AttnLRP(model)" in str(error.value)
    _no_capture_left()
    relevance = AttnLRP(model).attribute(ids, target=1, output="token", layer=model.embed)
    assert relevance.shape == (2, 7) and bool(torch.isfinite(relevance).all())
    assert bool((relevance != 0).any())


def test_attention_pooling_over_2d_scores_is_refused():
    model = MixerLayers(("attention", "none"), pool=True).eval()
    ids = _ids(seed=12) % 50
    with pytest.raises(ValueError, match=r"softmax over dim -1 of \(2, 7\) in MixerLayers"):
        CheferRelevance(model).attribute(ids, target=1)


@pytest.mark.parametrize("classes", [3, 7], ids=["3 classes", "as many classes as tokens"])
def test_softmax_attention_per_token_layers_and_a_class_softmax_are_explained_exactly(classes):
    model = MixerLayers(("attention", "none", "attention"), classes=classes).eval()
    ids = _ids(seed=12) % 50
    ours = CheferRelevance(model).attribute(ids, target=1, output="token")
    assert_close(ours, _pooled_reference(model, ids, torch.eye(7)[0]))


@pytest.mark.parametrize("kinds", [("attention", "none", "attention"), ("attention", "linear")])
def test_nothing_of_an_attribution_outlives_it(kinds):
    """A captured node's context refers to the recorder: no reference may lead back into the
    graph, or the graph below the first layer and all it saved would leak, call after call
    (and after a refusal)."""
    import gc

    model = MixerLayers(kinds).eval()
    ids = _ids(seed=12) % 50

    def alive() -> tuple[int, int]:
        gc.collect()
        objects = gc.get_objects()
        warnings.simplefilter("ignore", FutureWarning)  # isinstance on deprecated torch objects
        recorders = sum(isinstance(o, Recorder) for o in objects)
        return recorders, sum(isinstance(o, torch.Tensor) for o in objects)

    def attribute() -> None:
        try:
            CheferRelevance(model).attribute(ids, target=1)
        except ValueError:
            assert kinds[-1] == "linear"  # refused: token mixing

    attribute()
    before = alive()
    for _ in range(3):
        attribute()
    assert alive() == before and before[0] == 0


@pytest.mark.parametrize("method", [AttnLRP, CPLRP])
def test_lrp_explains_a_class_softmax_as_the_output(method):
    """CP-LRP holds attention probabilities constant; a softmax over the classes is not
    attention, and holding it constant left the output independent of the inputs."""
    model = MixerLayers(("attention", "none", "attention")).eval()
    ids = _ids(seed=12) % 50
    relevance = method(model).attribute(ids, target=1, output="token", layer=model.embed)
    assert relevance.shape == (2, 7) and bool(torch.isfinite(relevance).all())
    assert bool((relevance != 0).all())


def test_attention_computed_under_no_grad_is_left_out_without_a_crash():
    """HRM-style: earlier cycles run under no_grad, so their softmaxes have no autograd node;
    the scores check skips them, and the map is that of the layers with a gradient."""

    class NoGradCycle(MixerLayers):
        def forward(self, ids):
            with torch.no_grad():
                warm = super().forward(ids)
            return super().forward(ids) + 0 * warm

    model = NoGradCycle(("attention", "none", "attention")).eval()
    ids = _ids(seed=12) % 50
    ours = CheferRelevance(model).attribute(ids, target=1, output="token")
    plain = CheferRelevance(MixerLayers(("attention", "none", "attention")).eval())
    assert_close(ours, plain.attribute(ids, target=1, output="token"))


class PooledEncoder(nn.Module):
    """Two softmax-attention layers and a head that reads the output from ``pool``: the
    first token, the last, the mean of every token after ``skip``, or two tokens' heads
    averaged (a distilled DeiT)."""

    def __init__(self, pool: str, skip: int = 0) -> None:
        super().__init__()
        self.stack = MixerLayers(("attention", "attention"))
        self.pool, self.skip = pool, skip
        self.second = nn.Linear(16, 3)

    def forward(self, ids):
        x = self.stack.embed(ids)
        for layer in self.stack.layers:
            q, k, v = (t.unflatten(-1, (2, 8)).transpose(1, 2) for t in layer(x).chunk(3, -1))
            attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
            x = x + (attn @ v).transpose(1, 2).flatten(2)
        head = self.stack.head
        if self.pool == "first":
            return head(x[:, 0])
        if self.pool == "last":
            return head(x[:, -1])
        if self.pool == "mean":
            return head(x[:, self.skip :].mean(1))
        return (head(x[:, 0]) + self.second(x[:, 1])) / 2


@pytest.mark.parametrize(
    ("pool", "skip", "weights"),
    [
        ("first", 0, [0]),
        ("last", 0, [6]),
        ("mean", 0, list(range(7))),
        ("mean", 2, [2, 3, 4, 5, 6]),
    ],
)
def test_auto_reads_the_rows_the_output_is_computed_from(pool, skip, weights):
    """The backward shows which tokens' final states make the output: the first, the last, or
    the mean of every token after ``skip`` (a mean-pooled ViT after its prefix tokens). "auto"
    reads them; the old code read the first token or refused."""
    model = PooledEncoder(pool, skip).eval()
    ids = _ids(seed=13) % 50
    ours = CheferRelevance(model).attribute(ids, target=1, output="token", self_relevance="keep")
    rows = torch.zeros(7)
    rows[weights] = 1 / len(weights)
    assert_close(ours, _pooled_reference(model, ids, rows) + rows.double())
    mean = CheferRelevance(model).attribute(
        ids, target=1, output="token", self_relevance="keep", token_index="mean"
    )
    assert torch.equal(mean, ours)  # "mean": the mean of the rows the output depends on


def test_auto_refuses_two_heads_and_names_the_fix():
    """A distilled DeiT averages two heads over two tokens: no row of R is that output."""
    model = PooledEncoder("two heads").eval()
    ids = _ids(seed=13) % 50
    with pytest.raises(ValueError, match=r"tokens \[0, 1\].*different weights.*AttnLRP"):
        CheferRelevance(model).attribute(ids, target=1)
    ours = CheferRelevance(model).attribute(ids, target=1, output="token", token_index=0)
    rows = torch.zeros(7)
    rows[0] = 1.0
    assert_close(ours, _pooled_reference(model, ids, rows))


def test_auto_reads_the_first_token_where_the_head_does():
    explainer = CheferRelevance(PooledEncoder("first").eval())
    ids = _ids(seed=13) % 50
    expected = explainer.attribute(ids, 1, output="token", token_index=0)
    assert torch.equal(explainer.attribute(ids, 1, output="token"), expected)


def test_an_output_taken_at_a_padding_position_is_read_there():
    """The logit taken at a right-padded position is computed from that position's final
    state: "auto" reads it (as token_index=6 would), and padding keys get exactly 0."""
    model = models.llama()
    ids = _ids(seed=13) % 50
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0  # padded on the right, but the logit is taken at the last position

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits[:, -1]

    explainer = CheferRelevance(forward, model)
    ours = explainer.attribute(ids, target=1, additional_forward_args=(mask,))
    last = explainer.attribute(ids, target=1, additional_forward_args=(mask,), token_index=6)
    assert torch.equal(ours, last)
    assert (ours[1, -2:] == 0).all() and (ours[1, :-2] != 0).any()


def test_rotating_feature_halves_as_rotary_embeddings_do_is_not_a_shift():
    """``cat((-x2, x1), -1)`` over the features (rotate_half) with as many features as tokens,
    on the values too: no token moves, and the map is exact."""

    class RotatedValues(MixerLayers):
        def forward(self, ids):
            x = self.embed(ids)
            for layer in self.layers:
                q, k, v = layer(x).chunk(3, -1)
                q, k, v = (t.unflatten(-1, (2, 8)).transpose(1, 2) for t in (q, k, v))
                v = torch.cat((-v[..., 4:], v[..., :4]), -1)  # rotate_half on 8 features
                attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
                x = x + (attn @ v).transpose(1, 2).flatten(2)
            return self.head(x[:, 0])

    model = RotatedValues(("attention", "attention")).eval()
    ids = _ids(size=8, seed=14) % 50  # 8 tokens, 8 features per head
    ours = CheferRelevance(model).attribute(ids, target=1, output="token")
    weights = torch.zeros(8)
    weights[0] = 1.0
    assert_close(ours, _pooled_reference(model, ids, weights))


def _refusal(explain) -> str:
    with pytest.raises((ValueError, RuntimeError)) as error:
        explain()
    return str(error.value)


@pytest.mark.parametrize(
    ("case", "fix"),
    [
        ("token mixing", "AttnLRP(model)"),
        ("no attention", "LayerIntegratedGradients"),
        ("encoder-decoder", "CheferEncoderDecoder"),
    ],
)
def test_refusals_lead_with_the_cause_and_name_the_fix_that_applies_briefly(case, fix):
    """Each refusal is one cause and the fixes for this model, in about 400 characters."""
    if case == "token mixing":
        model = ConvMixModel(kernel=3).eval()
        message = _refusal(lambda: CheferRelevance(model).attribute(_ids(seed=8) % 50, 1))
    elif case == "no attention":
        cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(3))
        pixels = torch.randn(2, 3, 8, 8)
        cnn(pixels)
        message = _refusal(lambda: CheferRelevance(cnn).attribute(pixels, 1))
    else:
        bart = models.bart()
        message = _refusal(
            lambda: CheferRelevance(
                lambda i: bart(input_ids=i, decoder_input_ids=i).logits[:, -1], bart
            ).attribute(_ids(seed=2) % 90, 1)
        )
    assert fix in message and len(message) <= 450, message
