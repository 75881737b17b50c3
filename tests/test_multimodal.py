"""The bi-modal and encoder-decoder rules (ICCV 2021 eq. 6-11) against a plain float64 replica.

Random-init Hugging Face models: BART and T5 (encoder-decoder), CLIP and SigLIP (dual
encoders), ViLT and VisualBERT (single stream), LXMERT (co-attention).
"""

from __future__ import annotations

import copy

import models
import pytest
import torch
import torch.nn.functional as F
from reference import assert_close, one_hot_rows, read_rows, relevance_matrix
from reference_bimodal import (
    BimodalReference,
    abars,
    eager_double,
    encoder_decoder_rows,
    hooked_outputs,
    retained,
    rownorm_residual,
)

from captum_chefer.attr.multimodal import (
    CheferCoAttention,
    CheferDualEncoder,
    CheferEncoderDecoder,
    CheferSingleStream,
)
from captum_chefer.core.bimodal import (
    AttentionEdge,
    MultiModalRelevance,
    normalized_map,
)

transformers = pytest.importorskip("transformers")
TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _ids(batch: int, size: int, seed: int = 1, high: int = 90) -> torch.Tensor:
    return torch.randint(4, high, (batch, size), generator=torch.Generator().manual_seed(seed))


def _images(batch: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _pick(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, target[:, None]).squeeze(1)


# --- the rules on their own -------------------------------------------------------------------


def test_normalisation_is_safe_on_zero_rows():
    added = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 2.0]]])
    normalized = normalized_map(added)
    assert torch.isfinite(normalized).all()
    expected = torch.tensor([[[1.0, 0.0, 0.0], [0.25, 1.75, 0.0], [0.0, 0.0, 2.0]]])
    assert torch.equal(normalized, expected)
    assert torch.equal(normalized_map(torch.zeros(2, 4, 4)), torch.eye(4).expand(2, 4, 4))


def test_normalisation_matches_the_reference_on_random_maps():
    added = torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(0))
    added[1, 2] = 0.0
    expected = rownorm_residual(added.double() + torch.eye(5, dtype=torch.float64))
    assert_close(normalized_map(added), expected, rtol=1e-6)
    assert_close((normalized_map(added) - torch.eye(5)).sum(-1)[0], torch.ones(5), 1e-6)


def _random_abar(generator, batch, n_query, n_key, zero_row=None):
    abar = torch.rand(batch, n_query, n_key, generator=generator) / n_key
    if zero_row is not None:
        abar[:, zero_row] = 0.0
    return abar


def test_multimodal_state_matches_the_reference_equations():
    g = torch.Generator().manual_seed(3)
    sizes = {"t": 4, "i": 3}
    ours = MultiModalRelevance(sizes, batch=2)
    reference = BimodalReference(sizes, batch=2)
    for step in range(3):
        text, image = _random_abar(g, 2, 4, 4, zero_row=step), _random_abar(g, 2, 3, 3)
        ours.step([AttentionEdge("t", "t", text)])
        ours.step([AttentionEdge("i", "i", image)])
        reference.self_attention("t", text.double())
        reference.self_attention("i", image.double())
        to_image, to_text = _random_abar(g, 2, 4, 3, zero_row=1), _random_abar(g, 2, 3, 4)
        ours.step([AttentionEdge("t", "i", to_image), AttentionEdge("i", "t", to_text)])
        reference.cross_attention(("t", "i", to_image.double()), ("i", "t", to_text.double()))
    for pair, expected in reference.R.items():
        assert_close(ours.relevance(*pair), expected, rtol=1e-5)
        assert torch.isfinite(ours.relevance(*pair)).all()


def test_both_cross_directions_use_the_old_maps():
    g = torch.Generator().manual_seed(4)
    sizes = {"t": 3, "i": 3}
    together, in_turn = MultiModalRelevance(sizes, 1), MultiModalRelevance(sizes, 1)
    warm = [AttentionEdge(x, x, _random_abar(g, 1, 3, 3)) for x in "ti"]
    for state in (together, in_turn):
        for edge in warm:
            state.step([edge])
    edges = [AttentionEdge("t", "i", _random_abar(g, 1, 3, 3)) for _ in range(1)]
    edges.append(AttentionEdge("i", "t", _random_abar(g, 1, 3, 3)))
    together.step(edges)
    for edge in edges:
        in_turn.step([edge])
    reference = BimodalReference(sizes, 1)
    for edge in warm:
        reference.self_attention(edge.query, edge.abar.double())
    reference.cross_attention(*[(e.query, e.key, e.abar.double()) for e in edges])
    assert_close(together.relevance("t", "t"), reference.R["t", "t"], rtol=1e-6)
    assert_close(together.relevance("i", "i"), reference.R["i", "i"], rtol=1e-6)
    assert not torch.allclose(in_turn.relevance("i", "i"), together.relevance("i", "i"))


# --- encoder-decoder: BART, T5 ---------------------------------------------------------------


def bart():
    return models.bart()


def t5():
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=100,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
    )
    return transformers.T5ForConditionalGeneration(config).eval()


def _seq2seq_forward(model):
    return lambda ids, dec, mask: model(
        input_ids=ids, decoder_input_ids=dec, attention_mask=mask
    ).logits[:, -1]


def _seq2seq_reference(model, ids, dec, mask, target):
    reference = eager_double(model)
    out = reference(
        input_ids=ids, decoder_input_ids=dec, attention_mask=mask, output_attentions=True
    )
    encoder, decoder, cross = (
        retained(out.encoder_attentions),
        retained(out.decoder_attentions),
        retained(out.cross_attentions),
    )
    _pick(out.logits[:, -1], target).sum().backward()
    last = torch.full((ids.shape[0],), dec.shape[1] - 1)
    return encoder_decoder_rows(abars(encoder), abars(decoder), abars(cross), last)


@pytest.mark.parametrize("factory", [bart, t5], ids=["bart", "t5"])
def test_encoder_decoder_matches_reference_with_padding(factory):
    model = factory()
    ids, dec = _ids(3, 8), _ids(3, 5, seed=2)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    target = torch.tensor([3, 17, 42])
    source, prefix = CheferEncoderDecoder(_seq2seq_forward(model), model).attribute(
        (ids, dec), target, (mask,)
    )
    expected_source, expected_prefix = _seq2seq_reference(model, ids, dec, mask, target)
    assert_close(source, expected_source * mask)
    assert_close(prefix, expected_prefix)
    assert (source[1, 5:] == 0).all() and (source[1, :5] > 0).all()
    assert model.config._attn_implementation == "sdpa"


def test_encoder_decoder_batch_and_padding_invariance():
    model = bart()
    explainer = CheferEncoderDecoder(_seq2seq_forward(model), model)
    ids, dec = _ids(2, 8), _ids(2, 4, seed=2)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    batched = explainer.attribute((ids, dec), [5, 9], (mask,))
    for i, target in enumerate([5, 9]):
        size = int(mask[i].sum())
        alone = explainer.attribute(
            (ids[i : i + 1, :size], dec[i : i + 1]), target, (mask[i : i + 1, :size],)
        )
        assert_close(batched[0][i : i + 1, :size], alone[0], rtol=1e-5)
        assert_close(batched[1][i : i + 1], alone[1], rtol=1e-5)


def test_encoder_decoder_reads_the_given_decoder_position():
    model = bart()
    explainer = CheferEncoderDecoder(
        lambda ids, dec: model(input_ids=ids, decoder_input_ids=dec).logits[:, 1], model
    )
    ids, dec = _ids(1, 6), _ids(1, 4, seed=2)
    at_one = explainer.attribute((ids, dec), 7, token_index=1, output="token")
    truncated = explainer.attribute((ids, dec[:, :2]), 7, output="token")
    assert_close(at_one[0], truncated[0], rtol=1e-5)
    assert (at_one[1][:, 2:] == 0).all()


# --- dual encoders: CLIP, SigLIP -------------------------------------------------------------


def clip():
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=100, max_position_embeddings=16, eos_token_id=2, **TOWER),
        vision_config=dict(image_size=32, patch_size=8, **TOWER),
        projection_dim=16,
    )
    return transformers.CLIPModel(config).eval()


def siglip():
    torch.manual_seed(0)
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=100, max_position_embeddings=16, **TOWER),
        vision_config=dict(image_size=32, patch_size=8, **TOWER),
    )
    return transformers.SiglipModel(config).eval()


def _clip_texts():
    ids = _ids(2, 7, seed=3)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    ids[0, 6], ids[1, 4] = 99, 99  # CLIP pools the highest id (EOT) when eos_token_id == 2
    return ids, mask, torch.tensor([6, 4])


def test_clip_matches_reference_for_off_diagonal_pairs():
    model = clip()
    images, (ids, mask, eot) = _images(2), _clip_texts()
    target = [1, 0]
    image_map, text = CheferDualEncoder(model).attribute((images, ids), target, mask)
    reference = eager_double(model)
    out = reference(
        input_ids=ids, pixel_values=images.double(), attention_mask=mask, output_attentions=True
    )
    vision = retained(out.vision_model_output.attentions)
    texts = retained(out.text_model_output.attentions)
    (out.logits_per_image[0, 1] + out.logits_per_image[1, 0]).backward()
    image_rows = read_rows(
        relevance_matrix([a.detach() for a in vision], [a.grad for a in vision]),
        one_hot_rows([0, 0], 17),
    )
    text_rows = read_rows(
        relevance_matrix([a.detach() for a in texts], [a.grad for a in texts]),
        F.one_hot(eot, 7).double(),
    )
    expected_image = F.interpolate(
        image_rows[:, 1:].reshape(2, 1, 4, 4), size=(32, 32), mode="bilinear"
    ).expand(2, 3, 32, 32)
    assert_close(image_map, expected_image)
    assert_close(text, (text_rows * mask)[target])


def test_clip_batch_invariance_and_text_padding():
    model = clip()
    explainer = CheferDualEncoder(model)
    images, (ids, mask, _) = _images(2), _clip_texts()
    batched = explainer.attribute((images, ids), None, mask)
    alone = explainer.attribute((images[1:], ids[1:, :5]), None, mask[1:, :5])
    assert_close(batched[0][1:], alone[0], rtol=1e-5)
    assert_close(batched[1][1:, :5], alone[1], rtol=1e-5)
    assert (batched[1][1, 5:] == 0).all()
    with pytest.raises(ValueError, match="one text index per image"):
        explainer.attribute((images, ids), [0, 1, 0], mask)


def _manual_probe(mha: torch.nn.MultiheadAttention, kept: list):
    """nn.MultiheadAttention written out, keeping its softmax with retain_grad."""

    def forward(query, key, value, **_):
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
        heads = mha.num_heads

        def split(x, w, b):
            return F.linear(x, w, b).unflatten(-1, (heads, -1)).transpose(1, 2)

        q, k, v = split(query, w_q, b_q), split(key, w_k, b_k), split(value, w_v, b_v)
        attention = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        attention.retain_grad()
        kept.append(attention)
        return mha.out_proj((attention @ v).transpose(1, 2).flatten(2)), None

    return forward


def test_siglip_probe_head_and_last_text_token_match_reference():
    model = siglip()
    images, ids = _images(2), _ids(2, 7, seed=4)
    image_row, text_row = CheferDualEncoder(model).attribute((images, ids), output="token")
    reference = eager_double(model)
    kept: list[torch.Tensor] = []
    reference.vision_model.head.attention.forward = _manual_probe(
        reference.vision_model.head.attention, kept
    )
    out = reference(input_ids=ids, pixel_values=images.double(), output_attentions=True)
    vision = retained(out.vision_model_output.attentions)
    texts = retained(out.text_model_output.attentions)
    out.logits_per_image.diagonal().sum().backward()
    image_self = BimodalReference({"i": 16, "p": 1}, 2)
    for a in abars(vision):
        image_self.self_attention("i", a)
    image_self.cross_attention(("p", "i", abars(kept)[0]))
    text_expected = read_rows(
        relevance_matrix([a.detach() for a in texts], [a.grad for a in texts]),
        one_hot_rows([6, 6], 7),
    )
    assert_close(image_row, image_self.R["p", "i"][:, 0])
    assert_close(text_row, text_expected)


# --- single stream: ViLT, VisualBERT ---------------------------------------------------------


def vilt():
    torch.manual_seed(0)
    config = transformers.ViltConfig(
        vocab_size=100, max_position_embeddings=16, image_size=32, patch_size=8, **TOWER
    )
    config.num_labels = 3
    return transformers.ViltForQuestionAnswering(config).eval()


def _vilt_forward(model):
    return lambda ids, pixels, mask: (
        model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    )


def test_vilt_matches_reference_and_places_its_shuffled_patches():
    model = vilt()
    ids, images = _ids(2, 6), _images(2)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    target = torch.tensor([2, 0])
    explainer = CheferSingleStream(_vilt_forward(model), model)
    torch.manual_seed(5)
    text, image_map = explainer.attribute((ids, images), target, (mask,))
    torch.manual_seed(5)
    order = torch.stack([torch.multinomial(torch.ones(16), 16) for _ in range(2)])
    torch.manual_seed(5)
    reference = eager_double(model)
    out = reference(
        input_ids=ids, pixel_values=images.double(), attention_mask=mask, output_attentions=True
    )
    attentions = retained(out.attentions)
    _pick(out.logits, target).sum().backward()
    row = read_rows(
        relevance_matrix([a.detach() for a in attentions], [a.grad for a in attentions]),
        one_hot_rows([0, 0], 23),
    )
    assert_close(text, row[:, :6] * mask)
    cells = torch.zeros(2, 16, dtype=torch.float64).scatter(1, order, row[:, 7:])
    expected = F.interpolate(cells.reshape(2, 1, 4, 4), size=(32, 32), mode="bilinear")
    assert_close(image_map, expected.expand(2, 3, 32, 32))
    torch.manual_seed(6)
    assert_close(explainer.attribute((ids, images), target, (mask,))[1], image_map, rtol=1e-4)
    assert "visual_embed" not in vars(model.vilt.embeddings)


def test_visualbert_splits_text_and_regions():
    torch.manual_seed(0)
    config = transformers.VisualBertConfig(vocab_size=100, visual_embedding_dim=12, **TOWER)
    model = transformers.VisualBertModel(config).eval()
    ids, regions = _ids(2, 5), torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(7))
    forward = lambda i, v: model(input_ids=i, visual_embeds=v).pooler_output[:, :3]  # noqa: E731
    text, region_map = CheferSingleStream(forward, model).attribute((ids, regions), target=1)
    reference = eager_double(model)
    out = reference(input_ids=ids, visual_embeds=regions.double(), output_attentions=True)
    attentions = retained(out.attentions)
    out.pooler_output[:, 1].sum().backward()
    row = read_rows(
        relevance_matrix([a.detach() for a in attentions], [a.grad for a in attentions]),
        one_hot_rows([0, 0], 9),
    )
    assert_close(text, row[:, :5])
    assert_close(region_map, row[:, 5:, None].expand(2, 4, 12))


# --- co-attention: LXMERT --------------------------------------------------------------------


def lxmert():
    torch.manual_seed(0)
    config = transformers.LxmertConfig(
        vocab_size=100,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        l_layers=2,
        x_layers=2,
        r_layers=1,
        visual_feat_dim=12,
        visual_pos_dim=4,
        num_qa_labels=3,
    )
    return transformers.LxmertForQuestionAnswering(config).eval()


def test_lxmert_matches_reference_with_padding():
    model = lxmert()
    g = torch.Generator().manual_seed(8)
    ids, feats, boxes = (
        _ids(2, 6),
        torch.randn(2, 5, 12, generator=g),
        torch.rand(2, 5, 4, generator=g),
    )
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    target = torch.tensor([1, 2])

    def forward(i, v, p, m):
        return model(
            input_ids=i, visual_feats=v, visual_pos=p, attention_mask=m
        ).question_answering_score

    text, regions = CheferCoAttention(forward, model).attribute((ids, feats), target, (boxes, mask))
    reference = copy.deepcopy(model).double()
    probability_modules = [
        m.dropout for m in reference.modules() if type(m).__name__ == "LxmertAttention"
    ]
    maps = hooked_outputs(
        probability_modules,
        lambda: _pick(
            reference(
                input_ids=ids,
                visual_feats=feats.double(),
                visual_pos=boxes.double(),
                attention_mask=mask,
            ).question_answering_score,
            target,
        ),
    )
    state = BimodalReference({"t": 6, "i": 5}, 2)
    for a in maps[:2]:
        state.self_attention("t", a)
    state.self_attention("i", maps[2])
    for t_to_i, i_to_t, t_self, i_self in zip(*[iter(maps[3:])] * 4):
        state.cross_attention(("t", "i", t_to_i), ("i", "t", i_to_t))
        state.self_attention("t", t_self)
        state.self_attention("i", i_self)
    expected_text = state.R["t", "t"][:, 0] - F.one_hot(torch.tensor([0, 0]), 6)
    assert_close(text, expected_text * mask)
    assert_close(regions, state.R["t", "i"][:, 0, :, None].expand(2, 5, 12))
    assert (text[0, 4:] == 0).all()


# --- nothing left on the model ---------------------------------------------------------------


def _hooks_and_attributes(model):
    return [
        (sorted(vars(m)), len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()
    ]


def test_model_left_unchanged_also_on_error():
    model = vilt()
    before = _hooks_and_attributes(model)
    explainer = CheferSingleStream(_vilt_forward(model), model)
    ids, images, mask = _ids(1, 6), _images(1), torch.ones(1, 6, dtype=torch.long)
    explainer.attribute((ids, images), 1, (mask,))
    with pytest.raises(ValueError, match="segments"):
        explainer.attribute((ids, images), 1, (mask,), segments=(3, 3))
    with pytest.raises(IndexError):
        explainer.attribute((ids, images), 99, (mask,))
    assert _hooks_and_attributes(model) == before


def test_missing_modality_names_the_fix():
    model = bart()
    explainer = CheferCoAttention(_seq2seq_forward(model), model)
    with pytest.raises(ValueError, match="StreamMap"):
        explainer.attribute((_ids(1, 5), _ids(1, 3)), 1, (torch.ones(1, 5, dtype=torch.long),))


def test_detr_object_query_matches_reference():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    config = transformers.DetrConfig(
        use_timm_backbone=True,
        backbone="resnet10t",
        use_pretrained_backbone=False,
        num_queries=4,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_labels=3,
    )
    model = transformers.DetrForObjectDetection(config).eval()
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(9))
    explainer = CheferEncoderDecoder(lambda x: model(pixel_values=x).logits[:, 2], model)
    source = explainer.attribute(images, target=1, token_index=2, output="token")
    image_map = explainer.attribute(images, target=1, token_index=2)
    reference = eager_double(model)
    reference.model.backbone.requires_grad_(False)
    out = reference(pixel_values=images.double(), output_attentions=True)
    maps = [retained(out.encoder_attentions)]
    maps += [retained(out.decoder_attentions), retained(out.cross_attentions)]
    out.logits[:, 2, 1].sum().backward()
    expected, _ = encoder_decoder_rows(*[abars(m) for m in maps], torch.tensor([2]))
    assert_close(source, expected)
    grid = F.interpolate(expected.reshape(1, 1, 2, 3), size=(64, 96), mode="bilinear")
    assert_close(image_map, grid.expand(1, 3, 64, 96))
