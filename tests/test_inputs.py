"""The mistakes people make first get an error (or a warning) that names the fix, and the fix
works; ``help()`` of every public class reads without Captum's text that does not apply."""

from __future__ import annotations

import doctest
import pydoc
import re
import subprocess
import sys
import warnings

import models
import pytest
import torch

import captum_chefer
from captum_chefer import AttnLRP, CheferRelevance
from captum_chefer.attr import inputs as inputs_module


def _ids(batch: int = 2, size: int = 7, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 120, (batch, size), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def classifier():
    """A two-class BERT and an explainer that takes ids and the attention mask."""
    model = models.bert("sdpa", num_labels=2)
    explainer = CheferRelevance(
        lambda ids, mask: model(ids, attention_mask=mask).logits, model=model
    )
    return model, explainer


def _batch_encoding(ids: torch.Tensor, mask: torch.Tensor):
    from transformers import BatchEncoding

    return BatchEncoding({"input_ids": ids, "token_type_ids": ids * 0, "attention_mask": mask})


@pytest.mark.parametrize("as_dict", [False, True], ids=["BatchEncoding", "dict"])
def test_tokenizer_output_as_inputs_names_the_exact_call_and_the_call_works(classifier, as_dict):
    _, explainer = classifier
    ids, mask = _ids(), torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    batch = _batch_encoding(ids, mask)
    given = dict(batch) if as_dict else batch
    with pytest.raises(TypeError) as error:
        explainer.attribute(given, target=1)
    message = str(error.value)
    assert ("a dict" if as_dict else "a BatchEncoding") in message
    assert 'batch["input_ids"]' in message
    assert 'additional_forward_args=(batch["attention_mask"],)' in message
    assert "lambda ids, mask: model(ids, attention_mask=mask).logits" in message
    # the call the message names runs, and equals the explicit one
    fixed = explainer.attribute(
        batch["input_ids"], target=1, additional_forward_args=(batch["attention_mask"],)
    )
    assert torch.equal(fixed, explainer.attribute(ids, target=1, additional_forward_args=(mask,)))
    assert (fixed[1, 5:] == 0).all() and (fixed[1, 1:5] != 0).any()


def test_tokenizer_output_inside_a_tuple_and_other_non_tensors_are_named(classifier):
    _, explainer = classifier
    ids, mask = _ids(), torch.ones(2, 7, dtype=torch.long)
    with pytest.raises(TypeError, match=r"inputs\[1\] is a BatchEncoding"):
        explainer.attribute((ids, _batch_encoding(ids, mask)), target=1)
    with pytest.raises(TypeError, match="tokenize it first"):
        explainer.attribute("a gripping film", target=1)
    with pytest.raises(TypeError, match=r"tuple\(inputs\)"):
        explainer.attribute([ids], target=1)


def test_image_processor_output_names_pixel_values():
    call = inputs_module.tokenizer_output_call({"pixel_values": torch.zeros(1, 3, 8, 8)})
    assert 'explainer.attribute(batch["pixel_values"], target=...)' in call
    assert "additional_forward_args" not in call


def test_string_target_names_label2id(classifier):
    model, explainer = classifier
    ids, mask = _ids(), torch.ones(2, 7, dtype=torch.long)
    with pytest.raises(TypeError, match=re.escape("target=model.config.label2id['positive']")):
        explainer.attribute(ids, target="positive", additional_forward_args=(mask,))
    with pytest.raises(TypeError, match="is a string"):
        explainer.attribute(ids, target=["positive", "negative"], additional_forward_args=(mask,))
    model.config.label2id = {"negative": 0, "positive": 1}
    fixed = explainer.attribute(
        ids, target=model.config.label2id["positive"], additional_forward_args=(mask,)
    )
    assert torch.equal(fixed, explainer.attribute(ids, target=1, additional_forward_args=(mask,)))


@pytest.mark.parametrize(
    "target",
    [2, -3, torch.tensor([0, 2]), [1, 5], torch.tensor(7), torch.tensor([-1, 0])],
    ids=["int", "negative-int", "tensor", "list", "scalar-tensor", "negative-tensor"],
)
def test_out_of_range_target_names_the_number_of_classes(classifier, target):
    _, explainer = classifier
    ids, mask = _ids(), torch.ones(2, 7, dtype=torch.long)
    with pytest.raises(IndexError, match=r"the output has 2 classes \(shape \(2, 2\)\)"):
        explainer.attribute(ids, target=target, additional_forward_args=(mask,))


def test_other_bad_targets_name_the_fix(classifier):
    _, explainer = classifier
    ids, mask = _ids(), torch.ones(2, 7, dtype=torch.long)
    with pytest.raises(TypeError, match=r"target\.long\(\)"):
        explainer.attribute(ids, target=torch.tensor([0.0, 1.0]), additional_forward_args=(mask,))
    with pytest.raises(ValueError, match="list of 3 for a batch of 2"):
        explainer.attribute(ids, target=[0, 1, 1], additional_forward_args=(mask,))
    numpy = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match=r"int\(target\)"):
        explainer.attribute(ids, target=numpy.int64(1), additional_forward_args=(mask,))
    one_value = CheferRelevance(lambda ids, mask: explainer.forward_func(ids, mask)[:, 1], None)
    with pytest.raises(IndexError, match="pass target=None"):
        one_value.attribute(ids, target=0, additional_forward_args=(mask,))


def test_valid_targets_still_select_what_captum_selects(classifier):
    _, explainer = classifier
    ids, mask = _ids(), torch.ones(2, 7, dtype=torch.long)
    by_list = explainer.attribute(ids, target=[1, 0], additional_forward_args=(mask,))
    by_tensor = explainer.attribute(
        ids, target=torch.tensor([1, 0]), additional_forward_args=(mask,)
    )
    last = explainer.attribute(ids, target=-1, additional_forward_args=(mask,))
    assert torch.equal(by_list, by_tensor)
    assert torch.equal(last, explainer.attribute(ids, target=1, additional_forward_args=(mask,)))


def test_lrp_targets_get_the_same_checks():
    model = models.EncoderClassifier().eval()
    x = torch.randn(2, 4, 16)
    with pytest.raises(IndexError, match="classes"):
        AttnLRP(model).attribute(x, target=99)
    with pytest.raises(TypeError, match="label2id"):
        AttnLRP(model).attribute(x, target="cat")


def test_tuple_output_suggests_the_logits_not_the_pooler(classifier):
    model, explainer = classifier
    ids, mask = _ids(), torch.ones(2, 7, dtype=torch.long)
    returns_tuple = CheferRelevance(
        lambda ids, mask: model(ids, attention_mask=mask, return_dict=False), model=model
    )
    with pytest.raises(TypeError) as error:
        returns_tuple.attribute(ids, target=1, additional_forward_args=(mask,))
    message = str(error.value)
    assert "tuple of 1" in message and "[0]" in message and ".logits" in message
    assert "pooler_output" not in message
    fixed = CheferRelevance(
        lambda ids, mask: model(ids, attention_mask=mask, return_dict=False)[0], model=model
    ).attribute(ids, target=1, additional_forward_args=(mask,))
    assert torch.equal(fixed, explainer.attribute(ids, target=1, additional_forward_args=(mask,)))


def test_output_object_without_logits_is_named():
    model = models.bert("sdpa").bert  # the encoder: BaseModelOutputWithPooling, no .logits
    with pytest.raises(TypeError, match=r"BaseModelOutputWithPooling\w*, which has no .logits"):
        CheferRelevance(model).attribute(_ids(), target=0)


def test_padding_without_a_mask_warns_and_the_mask_fixes_it(classifier):
    model, explainer = classifier
    ids, mask = _ids(), torch.ones(2, 7, dtype=torch.long)
    ids[1, 5:], mask[1, 5:] = model.config.pad_token_id, 0
    no_mask = CheferRelevance(lambda ids: model(ids).logits, model=model)
    with pytest.warns(UserWarning, match=r"config.pad_token_id = 0.*attention_mask"):
        unmasked = no_mask.attribute(ids, target=1)
    assert (unmasked[1, 5:] != 0).any()  # what the warning is about: relevance on padding
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masked = explainer.attribute(ids, target=1, additional_forward_args=(mask,))
        no_mask.attribute(ids[:1], target=1)  # no padding in the ids: nothing to warn about
    assert (masked[1, 5:] == 0).all()


def test_padding_check_knows_a_decoder_that_starts_from_the_pad_id():
    from types import SimpleNamespace

    model = torch.nn.Module()
    model.config = SimpleNamespace(pad_token_id=0, decoder_start_token_id=0)
    decoder_ids = torch.tensor([[0, 5, 6], [0, 7, 8]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inputs_module.warn_unmasked_padding((decoder_ids,), None, model)
    with pytest.warns(UserWarning, match="pad_token_id"):
        inputs_module.warn_unmasked_padding((torch.tensor([[0, 5, 0]]),), None, model)


def test_errors_survive_python_optimize():
    """Captum's checks are asserts, which ``python -O`` removes; ours are raised."""
    code = (
        "import torch\n"
        "from captum_chefer import CheferRelevance\n"
        "layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)\n"
        "encoder = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()\n"
        "explainer = CheferRelevance(lambda x: encoder(x)[:, 0, :2], encoder)\n"
        "x = torch.randn(2, 3, 8)\n"
        "for inputs, target in (({'input_ids': x}, 0), (x, 'positive'), (x, 5)):\n"
        "    try:\n"
        "        explainer.attribute(inputs, target=target)\n"
        "    except (TypeError, IndexError) as error:\n"
        "        print(type(error).__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.stdout.split() == ["TypeError", "TypeError", "IndexError"], result.stderr


def test_inputs_doctests():
    result = doctest.testmod(inputs_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --- help() of the public classes ---------------------------------------------------------

CAPTUM_ONLY = ("completeness axiom", "Here we provide a specific implementation", "pyre-fixme")
CLASSES = [name for name in captum_chefer.__all__ if name[0].isupper()]


@pytest.mark.parametrize("name", CLASSES)
def test_help_reads_without_captums_convergence_delta_text(name):
    text = pydoc.render_doc(getattr(captum_chefer, name), renderer=pydoc.plaintext)
    assert not [phrase for phrase in CAPTUM_ONLY if phrase in text]
    if name != "CheferLLMAttribution":  # its __init__ (model, tokenizer) lives in attr/llm.py
        assert "forward_func (Callable or torch.nn.Module)" not in text  # Captum's __init__


def test_convergence_delta_is_refused_with_the_reason():
    explainer = CheferRelevance(models.EncoderClassifier().eval())
    assert explainer.has_convergence_delta() is False
    with pytest.raises(NotImplementedError, match="no convergence delta.*no baseline"):
        explainer.compute_convergence_delta(torch.zeros(1), None, torch.zeros(1))
