"""CheferLLMAttribution: Captum's LLM API, against the plain float64 replica of the rules."""

from __future__ import annotations

import models
import pytest
import torch
from reference import assert_close, hf_eager_attentions, read_rows, relevance_matrix
from reference_bimodal import abars, eager_double, encoder_decoder_rows, retained

from captum_chefer.attr.llm import CheferLLMAttribution

transformers = pytest.importorskip("transformers")
from captum.attr import LLMAttributionResult, TextTokenInput  # noqa: E402

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = [*SPECIAL, "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "and"]
PROMPT = "the cat sat on a mat and the dog"
TARGET = "ran far away"


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, "<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def bart():
    return models.bart(
        vocab_size=len(WORDS),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
    )


def _causal_reference(model, prompt, target, log_prob=False):
    """Row p_t of R for each target token t, over prompt + target[:-1]."""
    sequence = torch.cat([prompt[0], target[:-1]])[None]
    rows = []
    for t, token in enumerate(target.tolist()):
        position = prompt.shape[1] - 1 + t

        def select(out, position=position, token=token):
            logits = out.logits[:, position]
            return (logits.log_softmax(-1) if log_prob else logits)[:, token]

        attentions, grads = hf_eager_attentions(model, select, input_ids=sequence)
        start = torch.nn.functional.one_hot(torch.tensor([position]), sequence.shape[1]).double()
        rows.append(read_rows(relevance_matrix(attentions, grads), start))
    return torch.cat(rows)


@pytest.mark.parametrize("score", ["logit", "log_prob"])
def test_causal_lm_matches_reference(score):
    model, tok = llama(), tokenizer()
    inp = TextTokenInput(PROMPT, tok)
    explainer = CheferLLMAttribution(model, tok)
    result = explainer.attribute(inp, TARGET, include_generated=True, score=score, batch_size=2)
    prompt, target = inp.to_model_input(), torch.tensor(tok.encode(TARGET))
    expected = _causal_reference(model, prompt, target, log_prob=score == "log_prob")
    assert isinstance(result, LLMAttributionResult)
    assert result.input_tokens == PROMPT.split() + TARGET.split()[:-1]
    assert result.output_tokens == TARGET.split()
    assert_close(result.token_attr, expected)
    assert_close(result.seq_attr, expected.sum(0))
    probs = model(torch.cat([prompt[0], target[:-1]])[None]).logits[0, prompt.shape[1] - 1 :]
    assert_close(result.output_probs, probs.softmax(-1).gather(1, target[:, None]).squeeze(1))


def test_causal_lm_batching_blocks_and_skipped_tokens_agree():
    model, tok = llama(), tokenizer()
    explainer = CheferLLMAttribution(model, tok)
    one = explainer.attribute(TextTokenInput(PROMPT, tok), TARGET, batch_size=1)
    lean = explainer.attribute(TextTokenInput(PROMPT, tok), TARGET, batch_size=3, block_bytes=512)
    assert_close(lean.token_attr, one.token_attr, rtol=1e-5)
    assert one.token_attr.shape == (3, len(PROMPT.split()))
    skipped = explainer.attribute(TextTokenInput(PROMPT, tok, skip_tokens=["the"]), TARGET)
    keep = [word != "the" for word in PROMPT.split()]
    assert skipped.input_tokens == [w for w in PROMPT.split() if w != "the"]
    assert_close(skipped.token_attr, one.token_attr[:, keep], rtol=1e-5)


def test_seq2seq_matches_reference():
    model, tok = bart(), tokenizer()
    inp = TextTokenInput(PROMPT, tok)
    result = CheferLLMAttribution(model, tok).attribute(inp, TARGET, include_generated=True)
    prompt, target = inp.to_model_input(), torch.tensor(tok.encode(TARGET))
    decoder = torch.cat([torch.tensor([2]), target[:-1]])[None]
    sources, prefixes = [], []
    for t, token in enumerate(target.tolist()):
        reference = eager_double(model)
        out = reference(input_ids=prompt, decoder_input_ids=decoder, output_attentions=True)
        maps = [retained(out.encoder_attentions)]
        maps += [retained(out.decoder_attentions), retained(out.cross_attentions)]
        out.logits[0, t, token].backward()
        source, prefix = encoder_decoder_rows(*[abars(m) for m in maps], torch.tensor([t]))
        sources.append(source)
        prefixes.append(prefix)
    expected = torch.cat([torch.cat(sources), torch.cat(prefixes)], 1)
    assert result.input_tokens == PROMPT.split() + ["</s>"] + TARGET.split()[:-1]
    assert_close(result.token_attr, expected)


def test_generated_target_and_captum_plots():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    model, tok = llama(), tokenizer()
    explainer = CheferLLMAttribution(model, tok)
    args = {"max_new_tokens": 3, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    result = explainer.attribute(TextTokenInput(PROMPT, tok), gen_args=args)
    assert result.token_attr.shape == (len(result.output_tokens), len(PROMPT.split()))
    assert len(result.output_tokens) == 3
    figure, _ = result.plot_token_attr()
    figure_seq, _ = result.plot_seq_attr()
    matplotlib.pyplot.close(figure)
    matplotlib.pyplot.close(figure_seq)


def test_errors_name_the_fix():
    model, tok = llama(), tokenizer()
    explainer = CheferLLMAttribution(model, tok)
    with pytest.raises(TypeError, match="TextTokenInput"):
        explainer.attribute(PROMPT, TARGET)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gen_args"):
        explainer.attribute(TextTokenInput(PROMPT, tok), TARGET, gen_args={"max_new_tokens": 2})
    with pytest.raises(ValueError, match="batch_size"):
        explainer.attribute(TextTokenInput(PROMPT, tok), TARGET, batch_size=0)


@pytest.mark.parametrize("rule", ["attnlrp", "cplrp"])
@pytest.mark.parametrize("family", ["llama", "bart"])
def test_lrp_rules_in_the_llm_api_equal_the_rule_at_each_target_token(rule, family):
    """``rule="attnlrp"`` / ``"cplrp"``: each target token's row is the rule's relevance at the
    token embeddings, called directly on the teacher-forced sequence for that one token (batched
    here by 2; prompt and decoder prefix for BART), and the probabilities are the model's."""
    from captum_chefer import CPLRP, AttnLRP

    model, tok = (llama() if family == "llama" else bart().eval()), tokenizer()
    inp = TextTokenInput(PROMPT, tok)
    result = CheferLLMAttribution(model, tok, rule=rule).attribute(
        inp, TARGET, include_generated=True, batch_size=2
    )
    prompt, target = inp.to_model_input(), torch.tensor(tok.encode(TARGET))
    explainer = {"attnlrp": AttnLRP, "cplrp": CPLRP}[rule]
    rows, probs = [], []
    for t, token in enumerate(target.tolist()):
        if family == "llama":
            ids = torch.cat([prompt[0], target[:t]])[None]
            logits = model(ids).logits[:, -1]
            row = explainer(lambda i: model(i).logits[:, -1], model).attribute(ids, target=token)
            row = torch.nn.functional.pad(row, (0, len(target) - 1 - t))
        else:
            decoder = torch.cat([torch.tensor([2]), target[:t]])[None]
            logits = model(input_ids=prompt, decoder_input_ids=decoder).logits[:, -1]
            source, prefix = explainer(
                lambda p, d: model(input_ids=p, decoder_input_ids=d).logits[:, -1], model
            ).attribute((prompt, decoder), target=token)
            row = torch.cat([source, torch.nn.functional.pad(prefix, (0, len(target) - 1 - t))], 1)
        rows.append(row)
        probs.append(logits.softmax(-1)[0, token])
    assert_close(result.token_attr, torch.cat(rows))
    assert_close(result.output_probs, torch.stack(probs))


def test_an_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="'chefer', 'attnlrp' or 'cplrp'"):
        CheferLLMAttribution(llama(), tokenizer(), rule="lrp")  # type: ignore[arg-type]
