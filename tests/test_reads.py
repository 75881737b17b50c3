"""What is read comes from the computation: rows, padding and towers seen in the backward.

Every case here gave a silently wrong map, or a refusal where the backward already knew the
answer, before the rows were read off the backward (issue: "Read what the model computes").
The references are written out in float64 from the models' own attention maps and gradients,
and read at the rows each test's model is built to read (its head), never through the
package's reading.
"""

from __future__ import annotations

import copy
import math

import models
import pytest
import torch
import torch.nn.functional as F
from reference import assert_close, hf_eager_attentions, read_rows, relevance_matrix
from torch import nn

from captum_chefer import (
    AttentionRollout,
    CheferMultiModal,
    CheferRelevance,
    GradientRollout,
    RawAttention,
)
from captum_chefer.core.mapping import tokens_to_input
from captum_chefer.families import StreamMap

# ---------------------------------------------------------------------------------------------
# Hand-written attention with a padding mask in every format in use.

MASK_FORMATS = ["bool", "-inf", "-1e9", "finfo.min", "outer -1e9"]


def padding_mask(mask: torch.Tensor, layout: str, dtype: torch.dtype) -> torch.Tensor:
    """The attention mask of a padding mask ``(B, N)`` (1 = real) in one format: bool (True =
    attend), additive ``-inf``, ``-1e9`` or the dtype's minimum over the keys, or PyHealth's
    outer product ``-1e9·(1 − m_i m_j)``, under which a padded query attends every key."""
    real = mask.bool()
    if layout == "bool":
        return real[:, None, None, :]
    if layout == "outer -1e9":
        both = (real[:, :, None] & real[:, None, :]).to(dtype)
        return (-1e9 * (1 - both))[:, None]
    blocked = {"-inf": float("-inf"), "-1e9": -1e9, "finfo.min": torch.finfo(dtype).min}[layout]
    return torch.zeros(real.shape, dtype=dtype).masked_fill(~real, blocked)[:, None, None, :]


class MaskedEncoder(nn.Module):
    """Embeddings, then attention layers with a padding mask of one format, through SDPA or an
    explicit softmax, and a head that reads the first real token (``"cls"``) or the mean of
    the real tokens (``"mean"``). No positions: an example's map does not depend on where its
    padding is."""

    def __init__(self, layout: str, kernel: str, pool: str, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layout, self.kernel, self.pool = layout, kernel, pool
        self.embed = nn.Embedding(50, 16)
        self.qkv = nn.ModuleList([nn.Linear(16, 48) for _ in range(layers)])
        self.head = nn.Linear(16, 3)
        self.keep: list[torch.Tensor] | None = None

    def forward(self, ids, mask):
        x = self.embed(ids).to(self.head.weight.dtype)
        attention_mask = padding_mask(mask, self.layout, x.dtype)
        for qkv in self.qkv:
            q, k, v = (t.unflatten(-1, (2, 8)).transpose(1, 2) for t in qkv(x).chunk(3, -1))
            if self.kernel == "sdpa" and self.keep is None:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
            else:
                scores = q @ k.transpose(-1, -2) / math.sqrt(8)
                if attention_mask.dtype == torch.bool:
                    scores = scores.masked_fill(~attention_mask, float("-inf"))
                else:
                    scores = scores + attention_mask
                attn = torch.softmax(scores, -1).nan_to_num(0.0)
                if self.keep is not None:
                    attn.retain_grad()
                    self.keep.append(attn)
                out = attn @ v
            x = torch.tanh(x + out.transpose(1, 2).flatten(2))
        real = mask.to(x.dtype)
        if self.pool == "mean":
            return self.head((x * real[..., None]).sum(1) / real.sum(1, keepdim=True))
        first = mask.int().argmax(1)
        return self.head(x[torch.arange(x.shape[0]), first])


def masked_reference(model: MaskedEncoder, ids, mask, target: int) -> torch.Tensor:
    """The float64 map of the rows the head reads, from the model's own maps and gradients."""
    reference = copy.deepcopy(model).double()
    reference.keep = []
    reference(ids, mask)[:, target].sum().backward()
    maps = [a.detach() for a in reference.keep]
    relevance = relevance_matrix(maps, [a.grad for a in reference.keep])
    real = mask.bool()
    if model.pool == "mean":
        rows = real.double() / real.sum(1, keepdim=True)
    else:
        rows = F.one_hot(real.int().argmax(1), ids.shape[1]).double()
    return read_rows(relevance, rows)


def _padded(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 50, (3, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(3, 8, dtype=torch.long)
    if side == "right":
        mask[1, 5:], mask[2, 3:] = 0, 0
    else:
        mask[1, :3], mask[2, :5] = 0, 0
    return ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", MASK_FORMATS)
def test_padding_is_zero_and_the_read_rows_are_the_heads_under_every_mask(
    layout, kernel, pool, side
):
    """Under every mask format, kernel, pooling and padding side, the default read equals the
    reference at the head's rows, padding gets exactly 0, and each example's real tokens get
    the map of that example alone (no positions: padding must not change it). The old code
    found padding from the mask's format: PyHealth's outer-product mask hid it, so "mean"
    averaged padded rows in and padding got relevance; and it read the first position, which
    is padding after left padding."""
    model = MaskedEncoder(layout, kernel, pool).eval()
    ids, mask = _padded(side)
    explainer = CheferRelevance(model)
    ours = explainer.attribute(ids, 1, (mask,), output="token")
    assert_close(ours, masked_reference(model, ids, mask, 1), rtol=1e-5)
    assert (ours[mask == 0] == 0).all()
    real = mask[2].bool()
    alone = explainer.attribute(ids[2:, real], 1, (mask[2:, real],), output="token")
    assert_close(ours[2:, real], alone, rtol=1e-5)


@pytest.mark.parametrize("layout", ["bool", "outer -1e9"])
def test_mean_reads_the_rows_the_output_depends_on(layout):
    """``token_index="mean"`` is the mean over the rows the output is computed from: the real
    tokens of a masked mean pooling, whatever the mask's format (the old code averaged the
    padded rows in under PyHealth's outer-product mask)."""
    model = MaskedEncoder(layout, "eager", "mean").eval()
    ids, mask = _padded("right")
    ours = CheferRelevance(model).attribute(ids, 1, (mask,), token_index="mean", output="token")
    assert_close(ours, masked_reference(model, ids, mask, 1), rtol=1e-5)
    assert (ours[mask == 0] == 0).all()


def test_multihead_attention_with_a_key_padding_mask_reads_its_first_token():
    model = models.EncoderClassifier().eval()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    ours = CheferRelevance(model).attribute(x, 2, (padding,), output="token")
    alone = CheferRelevance(model).attribute(x[1:, :4], 2, (padding[1:, :4],), output="token")
    assert (ours[1, 4:] == 0).all()
    assert_close(ours[1:, :4], alone, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Hugging Face decoders: padding on either side, sliding windows shorter than the input.

DECODERS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"sliding_window": 4, "num_local_experts": 2, "num_experts_per_tok": 1},
    ),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {"sliding_window": 4}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": 4, "head_dim": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"sliding_window": 4, "head_dim": 8}),
}


def decoder(family: str, attn_implementation: str):
    import transformers

    config_name, model_name, extra = DECODERS[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(
        vocab_size=60,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn_implementation,
        **extra,
    )
    return getattr(transformers, model_name)(config).eval()


DECODER_CASES = [
    (family, implementation, side)
    for family in sorted(DECODERS)
    for implementation in ("sdpa", "eager")
    for side in ("right", "left")
    if not (family == "gemma2" and implementation == "sdpa")  # no SDPA (softcapping)
]


@pytest.mark.parametrize(("family", "attn_implementation", "side"), DECODER_CASES)
def test_decoders_are_exact_at_the_last_real_token_with_windows_and_padding(
    family, attn_implementation, side
):
    """The logit of each example's last real token, 12 tokens, windows of 4, 7 padded tokens on
    either side: "auto" reads that token's row, exactly (the old code read another row on the
    right-padded sliding-window models at eager, relative error 1.0, and refused the others)."""
    model = decoder(family, attn_implementation)
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 12, dtype=torch.long)
    if side == "right":
        mask[1, 5:] = 0
    else:
        mask[1, :7] = 0
    last = torch.tensor([11, 4 if side == "right" else 11])

    def forward(ids, mask):
        logits = model(input_ids=ids, attention_mask=mask).logits
        return logits[torch.arange(2), last]

    ours = CheferRelevance(forward, model).attribute(ids, 7, (mask,), output="token")
    # In float64, a query row whose every key is masked (padding, or a window over padding
    # only) overflows the dtype's minimum to -inf and gives NaN, which the backward spreads;
    # Mixtral's grouped expert products take no float64. The reference runs in float32.
    maps, grads = hf_eager_attentions(
        model,
        lambda out: out.logits[torch.arange(2), last, 7],
        torch.float32,
        input_ids=ids,
        attention_mask=mask,
    )
    expected = read_rows(relevance_matrix(maps, grads), F.one_hot(last, 12).double())
    assert_close(ours, expected, rtol=1e-4)
    assert (ours[mask == 0] == 0).all()


def test_an_output_read_at_another_token_than_the_conventions_is_read_there():
    """A ``(B, 2, C)`` head over tokens 0 and 1 with ``target=(1, 2)``: the output is token 1's,
    and "auto" reads token 1 (the old code refused, asking for token_index=1)."""

    class TwoTokenHeads(MaskedEncoder):
        def forward(self, ids, mask):
            x = self.embed(ids).to(self.head.weight.dtype)
            for qkv in self.qkv:
                q, k, v = (t.unflatten(-1, (2, 8)).transpose(1, 2) for t in qkv(x).chunk(3, -1))
                out = F.scaled_dot_product_attention(q, k, v)
                x = torch.tanh(x + out.transpose(1, 2).flatten(2))
            return self.head(x[:, :2])

    model = TwoTokenHeads("bool", "sdpa", "cls").eval()
    ids, mask = _padded("right")
    explainer = CheferRelevance(model)
    ours = explainer.attribute(ids, (1, 2), (mask,), output="token")
    assert torch.equal(
        ours, explainer.attribute(ids, (1, 2), (mask,), output="token", token_index=1)
    )


# ---------------------------------------------------------------------------------------------
# Towers: one transformer per input feature (PyHealth's Transformer), found, not declared.


class MaskedHandAttention(models.HandAttention):
    """``HandAttention`` with an additive mask on its scores."""

    def forward(self, x, bias):
        batch, size, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, size, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias, dim=-1)
        if self.keep is not None:
            attn.retain_grad()
            self.keep.append(attn)
        return x + self.proj((attn @ v).transpose(1, 2).reshape(batch, size, dim))


class PerFeatureTransformer(nn.Module):
    """One transformer per input feature, as PyHealth's ``Transformer``: each feature's codes
    (``0`` = padding) are embedded after a learned CLS token, attend under PyHealth's mask
    ``-1e9·(1 − m_i m_j)``, and the CLS states of all features are concatenated for the head
    (or, with ``pool="mean"``, the masked means)."""

    def __init__(self, features: int = 2, layers: int = 2, pool: str = "cls") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pool = pool
        self.cls = nn.Parameter(torch.randn(features, 16))
        self.embed = nn.ModuleList([nn.Embedding(30, 16) for _ in range(features)])
        self.blocks = nn.ModuleList(
            [
                nn.ModuleList([MaskedHandAttention(16, 2) for _ in range(layers)])
                for _ in range(features)
            ]
        )
        self.head = nn.Linear(16 * features, 3)

    def forward(self, *codes):
        pooled = []
        for f, ids in enumerate(codes):
            real = torch.cat([torch.ones_like(ids[:, :1]), ids != 0], 1).to(self.cls.dtype)
            x = torch.cat([self.cls[f].expand(ids.shape[0], 1, 16), self.embed[f](ids)], 1)
            bias = (-1e9 * (1 - real[:, :, None] * real[:, None, :]))[:, None]
            for block in self.blocks[f]:
                x = torch.tanh(block(x, bias))
            if self.pool == "mean":
                pooled.append((x * real[..., None]).sum(1) / real.sum(1, keepdim=True))
            else:
                pooled.append(x[:, 0])
        return self.head(torch.cat(pooled, -1))


def _codes() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(6)
    conditions = torch.randint(1, 30, (4, 6), generator=generator)
    procedures = torch.randint(1, 30, (4, 4), generator=generator)
    conditions[1, 3:], conditions[2, 1:], procedures[0, 2:], procedures[3, 1:] = 0, 0, 0, 0
    return conditions, procedures


def tower_reference(model: PerFeatureTransformer, codes, target: int) -> list[torch.Tensor]:
    """Per feature, the float64 map of its CLS row (or the mean of its real rows)."""
    reference = copy.deepcopy(model).double()
    for blocks in reference.blocks:
        for block in blocks:
            block.keep = []
    reference(*codes)[:, target].sum().backward()
    found = []
    for f, ids in enumerate(codes):
        kept = [block.keep[0] for block in reference.blocks[f]]
        relevance = relevance_matrix([a.detach() for a in kept], [a.grad for a in kept])
        real = torch.cat([torch.ones_like(ids[:, :1]), ids != 0], 1).double()
        rows = (
            real / real.sum(1, keepdim=True)
            if model.pool == "mean"
            else F.one_hot(torch.zeros(ids.shape[0], dtype=torch.long), ids.shape[1] + 1).double()
        )
        found.append(read_rows(relevance, rows))
    return found


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_one_transformer_per_feature_explains_each_input_through_its_own_layers(pool):
    """CheferRelevance on (conditions, procedures): each input is explained through the stack
    its codes feed, read at that stack's own rows; padding gets 0 (the old code refused,
    blaming channel attention)."""
    model = PerFeatureTransformer(pool=pool).eval()
    codes = _codes()
    ours = CheferRelevance(model).attribute(codes, target=2, output="token")
    for mine, expected, ids in zip(ours, tower_reference(model, codes, 2), codes):
        assert_close(mine, expected, rtol=1e-5)
        assert (mine[:, 1:][ids == 0] == 0).all()


def test_one_stream_per_feature_with_cheferMultiModal_reads_each_streams_own_rows():
    """A hand-written stream per feature at the default token_index: each stream is read at
    its own CLS row (the old code read the last position, padding in most examples, and put
    1.0 on it)."""
    model = PerFeatureTransformer().eval()
    codes = _codes()
    streams = StreamMap(
        (
            (r"blocks\.0\.", (("conditions", "conditions"),)),
            (r"blocks\.1\.", (("procedures", "procedures"),)),
        )
    )
    explainer = CheferMultiModal(model, model, streams, "conditions", ("conditions", "procedures"))
    conditions = explainer.attribute(codes, target=2, output="token")[0]
    assert_close(conditions, tower_reference(model, codes, 2)[0], rtol=1e-5)
    assert (conditions[:, 1:][codes[0] == 0] == 0).all()


@pytest.mark.parametrize("method", [RawAttention, AttentionRollout, GradientRollout])
def test_the_baselines_read_each_tower_too(method):
    model = PerFeatureTransformer().eval()
    codes = _codes()
    conditions, procedures = method(model).attribute(codes, target=2, output="token")
    alone = method(lambda c: model(c, codes[1]), model).attribute(
        codes[0], target=2, output="token"
    )
    assert torch.equal(conditions, alone) and procedures.shape == (4, 5)


def test_an_input_feeding_two_towers_is_refused_naming_the_fix():
    model = PerFeatureTransformer().eval()
    conditions, _ = _codes()
    with pytest.raises(ValueError, match=r"input 0 feeds 2 of them.*detached"):
        CheferRelevance(lambda c: model(c, c[:, :4]), model).attribute(conditions, target=0)


def test_model_narrows_the_capture_to_that_modules_calls():
    """``model=`` a submodule: only its calls are explained. Two encoders, the second one
    given: the map is the second's alone (the old code captured both and refused)."""
    first, second = models.EncoderClassifier().eval(), models.EncoderClassifier().eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))

    def forward(x):
        return second(first.encoder(x))

    ours = CheferRelevance(forward, second).attribute(x, target=1, output="token")
    encoded = first.encoder(x).detach()
    assert_close(ours, CheferRelevance(second).attribute(encoded, target=1, output="token"))


# ---------------------------------------------------------------------------------------------
# Bad input: non-finite outputs, empty batches.


def test_a_nan_input_is_refused_naming_the_example():
    model = models.EncoderClassifier().eval()
    x = torch.randn(3, 5, 16)
    x[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite for examples \[1\]"):
        CheferRelevance(model).attribute(x, target=0)
    fine = CheferRelevance(model).attribute(x[[0, 2]], target=0)
    assert bool(torch.isfinite(fine).all())


@pytest.mark.parametrize("output", ["input", "token"])
def test_an_empty_batch_gives_empty_maps(output):
    model = models.bert()
    ids = torch.zeros(0, 7, dtype=torch.long)
    empty = CheferRelevance(lambda i: model(i).logits, model).attribute(ids, 0, output=output)
    assert empty.shape == (0, 7)


def test_a_four_dimensional_input_of_per_token_features_is_not_taken_for_an_image():
    """Inputs ``(B, N, 2, 2)`` (PyHealth's deep nested floats): each token's relevance lands on
    that token's entries (the old code laid 5 tokens out as a class token and a 2x2 patch grid,
    with no error)."""

    class PerTokenFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Linear(4, 16)
            self.encoder = models.EncoderClassifier()

        def forward(self, x):
            return self.encoder(self.embed(x.flatten(2)))

    model = PerTokenFeatures().eval()
    x = torch.randn(2, 5, 2, 2, generator=torch.Generator().manual_seed(1))
    rows = CheferRelevance(model, model.encoder).attribute(x, target=1, output="token")
    mapped = CheferRelevance(model, model.encoder).attribute(x, target=1)
    assert mapped.shape == x.shape
    assert torch.equal(mapped, rows[:, :, None, None].expand_as(x))


class ZeroedRows(nn.Module):
    """An explicit softmax under a ``-inf`` pair mask, whose fully masked rows (NaN) the model
    then fills with 0, as CPM-Ant does."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.ModuleList([nn.Linear(16, 48) for _ in range(2)])
        self.head = nn.Linear(16, 3)

    def forward(self, x, mask):
        pair = (mask[:, :, None] & mask[:, None, :])[:, None]
        for qkv in self.qkv:
            q, k, v = (t.unflatten(-1, (2, -1)).transpose(1, 2) for t in qkv(x).chunk(3, -1))
            scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~pair, float("-inf"))
            attn = scores.softmax(-1).masked_fill(~pair, 0.0)
            x = x + (attn @ v).transpose(1, 2).flatten(2)
        return self.head(x[:, 0])


def test_rows_a_model_zeroes_after_a_nan_softmax_give_a_finite_exact_map():
    """The padded example's map was all NaN (NaN attention times a zero gradient), silently."""
    model = ZeroedRows().eval()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    ours = CheferRelevance(model).attribute(x, 1, (mask,), output="token")
    alone = CheferRelevance(model).attribute(x[1:, :4], 1, (mask[1:, :4],), output="token")
    assert bool(torch.isfinite(ours).all()) and (ours[1, 4:] == 0).all()
    assert_close(ours[1:, :4], alone, rtol=1e-5)


def test_a_backward_that_is_not_finite_is_refused_naming_the_examples():
    """The output is finite but the model's own gradient is not (a root of exactly zero, as
    Gemma 3n on left padding): the map would be NaN; it is refused by example."""

    class RootOfZero(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = models.EncoderClassifier()

        def forward(self, x, gate):
            first, second = self.encoder.encoder.layers
            h = first(x)
            scale = (h.pow(2).mean((1, 2), keepdim=True) * gate) ** 0.5  # 0 where gate is 0
            return self.encoder.head(second(h * scale)[:, 0])

    model = RootOfZero().eval()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    gate = torch.ones(3, 1, 1)
    gate[1] = 0.0
    with pytest.raises(ValueError, match=r"gradient of the explained output is NaN or infinite "
                       r"for examples \[1\]"):  # fmt: skip
        CheferRelevance(model).attribute(x, target=0, additional_forward_args=(gate,))


def test_ids_and_embeddings_stay_per_token_when_the_call_also_carries_image_hints():
    """A multimodal call (ViLT) passes patch positions for its image; its text ids ``(B, N)`` and
    embeddings ``(B, N, D)`` still get one value per token (they were refused when the 4-D image
    rule learned to read per-token features)."""
    row = torch.arange(12.0).view(2, 6)
    hints = {"num_prefix_tokens": 1, "patch_grid": (2, 2)}
    assert torch.equal(tokens_to_input(row, torch.Size([2, 6]), **hints), row)
    embedded = tokens_to_input(row, torch.Size([2, 6, 3]), **hints)
    assert torch.equal(embedded, row[:, :, None].expand(2, 6, 3))
