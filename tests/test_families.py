"""The family tables: a family added by one table entry, and the deprecated names.

BLIP's image-text matching (``BlipForImageTextRetrieval`` with ``use_itm_head=True``) is
supported only through its entry in ``captum_chefer.families.table``; its map is checked
against a plain float64 replica of eq. 6-11 on a random-init model.
"""

from __future__ import annotations

import copy

import models
import pytest
import torch
import torch.nn.functional as F
from reference import assert_close
from reference_bimodal import encoder_decoder_rows, hooked_outputs

from captum_chefer import (
    CheferDualEncoder,
    CheferEncoderDecoder,
    CheferMultiModal,
    CheferSingleStream,
)
from captum_chefer.families import FAMILIES, family_for

transformers = pytest.importorskip("transformers")
TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def blip():
    torch.manual_seed(0)
    config = transformers.BlipConfig(
        text_config=dict(
            vocab_size=100, max_position_embeddings=16, encoder_hidden_size=32, **TOWER
        ),
        vision_config=dict(image_size=32, patch_size=8, **TOWER),
    )
    model = transformers.BlipForImageTextRetrieval(config).eval()
    # BLIP's default init (std 0.02) leaves random-init gradients near 1e-11, below float32's
    # resolution of the forward; larger weights give relevance well above it.
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.2)
    return model


def _itm(model):
    return lambda ids, pixels, mask: (
        model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=True).itm_score
    )


def test_blip_itm_is_one_table_entry_and_matches_the_reference():
    model = blip()
    assert family_for(model) is FAMILIES["blip-itm"]
    ids = torch.randint(4, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    explainer = CheferMultiModal(_itm(model), model)
    text, image_map = explainer.attribute((ids, images), 1, (mask,))
    text_row, image_row = explainer.attribute((ids, images), 1, (mask,), output="token")

    reference = copy.deepcopy(model).double()
    dropouts = [
        module.dropout
        for module in reference.modules()
        if type(module).__name__ in ("BlipAttention", "BlipTextSelfAttention")
    ]
    maps = hooked_outputs(
        dropouts, lambda: _itm(reference)(ids, images.double(), mask)[:, 1]
    )  # call order: 2 vision layers, then (self, cross) per text layer
    source, prefix = encoder_decoder_rows(maps[:2], maps[2::2], maps[3::2], torch.tensor([0, 0]))
    assert_close(text, prefix * mask)
    assert_close(text_row, prefix * mask)
    assert_close(image_row, source)
    expected = F.interpolate(source[:, 1:].reshape(2, 1, 4, 4), size=(32, 32), mode="bilinear")
    assert_close(image_map, expected.expand(2, 3, 32, 32))
    assert (text[1, 5:] == 0).all()
    assert_close(
        CheferMultiModal(_itm(model), model, family="blip-itm").attribute(
            (ids, images), 1, (mask,)
        )[0],
        text,
    )


def test_deprecated_names_still_work_with_a_warning():
    from captum_chefer import core
    from captum_chefer.core.bimodal import normalize_self_relevance, normalized_map
    from captum_chefer.core.readers import ReadSetup
    from captum_chefer.core.tokens import row_weights, token_start_rows

    added = torch.rand(1, 3, 3)
    with pytest.warns(DeprecationWarning, match="normalized_map"):
        assert torch.equal(normalize_self_relevance(added), normalized_map(added))
    real = torch.tensor([[True, True, False]])
    with pytest.warns(DeprecationWarning, match="row_weights"):
        assert torch.equal(token_start_rows("auto", real, True), row_weights("auto", real, True))
    for old, new in (
        ("RowReader", "Reader"),
        ("RowRelevance", "CheferRowReader"),
        ("MatrixRelevance", "CheferMatrixReader"),
    ):
        with pytest.warns(DeprecationWarning, match=new):
            assert getattr(core, old) is getattr(core, new)
    with pytest.warns(DeprecationWarning, match="Reader"):
        from captum_chefer.capture import Consumer  # noqa: F401
    setup = ReadSetup(torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), 1)
    with pytest.warns(DeprecationWarning, match="row_weights"):
        assert setup.start is setup.row_weights
    with pytest.warns(DeprecationWarning, match="real"):
        assert setup.valid is setup.real


def test_dual_encoder_takes_the_order_of_every_class_and_warns_on_the_old_one():
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=100, eos_token_id=2, **TOWER),
        vision_config=dict(image_size=32, patch_size=8, **TOWER),
    )
    model = transformers.CLIPModel(config).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(4, 90, (2, 6), generator=torch.Generator().manual_seed(3))

    def forward(pixels, input_ids):
        return model(pixel_values=pixels, input_ids=input_ids).logits_per_image

    expected = CheferDualEncoder(model).attribute((images, ids))
    new = CheferDualEncoder(forward, model).attribute((images, ids))
    with pytest.warns(DeprecationWarning, match="CheferDualEncoder\\(forward_func, model\\)"):
        old = CheferDualEncoder(model, forward).attribute((images, ids))
    for ours in (new, old):
        assert_close(ours[0], expected[0], rtol=1e-6)
        assert_close(ours[1], expected[1], rtol=1e-6)


def test_every_class_runs_the_same_checks():
    """The checks live in the one flow, so the multi-stream classes get them too."""
    torch.manual_seed(0)
    config = transformers.VisualBertConfig(vocab_size=100, visual_embedding_dim=12, **TOWER)
    model = transformers.VisualBertModel(config).eval()
    ids = torch.randint(4, 90, (2, 5), generator=torch.Generator().manual_seed(1))
    regions = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(2))

    def twice(i, v):  # a siamese forward: two runs of the model are not one chain of layers
        return (
            model(input_ids=i, visual_embeds=v).pooler_output
            + model(input_ids=i, visual_embeds=v).pooler_output
        )

    with pytest.raises(ValueError, match="siamese"):
        CheferSingleStream(twice, model).attribute((ids, regions), target=0)
    bart = models.bart()
    seq2seq = CheferEncoderDecoder(
        lambda i, d: bart(input_ids=i, decoder_input_ids=d).logits[:, -1], bart
    )
    source, prefix = ids, ids[:, :3]
    with pytest.raises(ValueError, match="self_relevance must be one of"):
        seq2seq.attribute((source, prefix), 1, self_relevance="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token_index='mean'"):
        seq2seq.attribute((source, prefix), 1, token_index="mean", self_relevance="zero")
