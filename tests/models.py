"""Small seeded models for the tests: random-init Hugging Face, timm and plain PyTorch."""

from __future__ import annotations

import math
import os

import torch
from torch import nn

import captum_chefer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bert(attn_implementation: str = "sdpa", num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=num_labels,
        attn_implementation=attn_implementation,
    )
    return BertForSequenceClassification(config).eval()


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=120, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def llama(attn_implementation: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=120,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config).eval()


def bart(**overrides):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    settings = dict(
        vocab_size=100,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=40,
    )
    return BartForConditionalGeneration(BartConfig(**(settings | overrides))).eval()


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=5,
    )
    return ViTForImageClassification(config).eval()


def deit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=3).eval()


class EncoderClassifier(nn.Module):
    """``nn.TransformerEncoder`` over embeddings, classified from the first token."""

    def __init__(self, dim: int = 16, heads: int = 4, layers: int = 2, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x, padding_mask=None):
        return self.head(self.encoder(x, src_key_padding_mask=padding_mask)[:, 0])


class HandAttention(nn.Module):
    """Custom attention with a hand-written softmax, opted in through ``mark_attention``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.keep: list[torch.Tensor] | None = None

    def forward(self, x):
        batch, size, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, size, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        attn = captum_chefer.mark_attention(attn)
        if self.keep is not None:
            attn.retain_grad()
            self.keep.append(attn)
        return x + self.proj((attn @ v).transpose(1, 2).reshape(batch, size, dim))


class HandModel(nn.Module):
    """Token ids → embeddings → hand-written attention blocks → class from token 0."""

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 2, layers: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([HandAttention(dim, heads) for _ in range(layers)])
        self.head = nn.Linear(dim, 4)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x[:, 0])


class UnmarkedModel(HandModel):
    """The same model with its softmax written out and no ``mark_attention``: nothing can be
    captured."""

    def __init__(self) -> None:
        super().__init__()
        for block in self.blocks:
            block.forward = self._plain(block)  # type: ignore[method-assign]

    @staticmethod
    def _plain(block):
        def forward(x):
            q = k = v = block.qkv(x)[..., : x.shape[-1]]
            scores = (q @ k.transpose(-1, -2)).exp()  # a softmax written out: nothing to see
            return x + scores / scores.sum(-1, keepdim=True) @ v

        return forward
