"""Small seeded PyHealth datasets and models, and the independent float64 references.

The references never call this package. Chefer's rule (ICCV 2021 eq. 5-6, REFERENCE §1) is
applied to attention ``A`` and its gradient ``dA`` captured in float64:

- ``Transformer``, ``StageAttentionNet``: on a float64 copy of the model, through PyHealth's own
  ``set_attention_hooks`` / ``get_attention_layers`` (its hooks keep ``A`` and ``dA``);
- ``TorchvisionModel``'s ViT: a float64 forward of torchvision's ``VisionTransformer`` written
  out here, with the attention formed explicitly (checked against the model's own output).

``R = I``; ``R ← R + mean_h(clamp(dA ⊙ A, 0))·R`` per layer in forward order; the row read is
the one the model's output is computed from, which the reference states per model.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import torch
import torch.nn.functional as F
from pyhealth.datasets import create_sample_dataset, get_dataloader
from torch import Tensor, nn

PROCESSORS = (
    "sequence",
    "nested_sequence",
    "nested_sequence_floats",
    "deep_nested_sequence_floats",
    "timeseries",
    "stagenet",
    "stagenet_nested",
    "stagenet_tensor",
    "tensor",
    "multi_hot",
)
"""Every input processor PyHealth's ``Transformer`` accepts here (``stagenet_nested`` is the
``stagenet`` processor on nested codes). Text processors need a pretrained Hugging Face model
from the Hub, and ``deep_nested_sequence`` codes crash the model itself."""

CLASSES = ("a", "b", "c")


def feature_value(kind: str, rng: random.Random) -> Any:
    """One patient's raw value of a feature of processor ``kind``, of random length."""
    length = rng.randint(1, 4)
    codes = [f"c{rng.randint(0, 9)}" for _ in range(length)]
    times = [float(t) for t in range(length)]
    nested = [[f"c{rng.randint(0, 9)}" for _ in range(rng.randint(1, 3))] for _ in range(length)]
    floats = [[rng.random() for _ in range(3)] for _ in range(length)]
    values = {
        "sequence": lambda: codes,
        "multi_hot": lambda: codes,
        "nested_sequence": lambda: nested,
        "nested_sequence_floats": lambda: floats,
        "deep_nested_sequence_floats": lambda: [
            [[rng.random() for _ in range(3)] for _ in range(2)] for _ in range(length)
        ],
        "timeseries": lambda: (
            [datetime(2020, 1, 1) + timedelta(hours=h) for h in range(length)],
            [[rng.random() for _ in range(3)] for _ in range(length)],
        ),
        "stagenet": lambda: (times, codes),
        "stagenet_nested": lambda: (times, nested),
        "stagenet_tensor": lambda: (times, floats),
        "tensor": lambda: [rng.random() for _ in range(5)],
    }
    value = values[kind]()
    if kind == "timeseries":
        import numpy as np

        return value[0], np.asarray(value[1])
    return value


def label(task: str, index: int, rng: random.Random) -> Any:
    if task == "binary":
        return index % 2
    if task == "multiclass":
        return index % len(CLASSES)
    return [c for c in CLASSES if rng.random() < 0.5] or [CLASSES[index % len(CLASSES)]]


def dataset(features: Mapping[str, str], task: str = "binary", n: int = 8, seed: int = 0):
    """A PyHealth sample dataset with one feature per ``name: processor kind`` and a label."""
    rng = random.Random(seed)
    samples = [
        {
            "patient_id": f"p{i}",
            "visit_id": "v0",
            **{name: feature_value(kind, rng) for name, kind in features.items()},
            "label": label(task, i, rng),
        }
        for i in range(n)
    ]
    schema = {
        name: "stagenet" if kind == "stagenet_nested" else kind for name, kind in features.items()
    }
    return create_sample_dataset(samples, schema, {"label": task}, dataset_name="synthetic")


def first_batch(data, size: int = 8) -> dict[str, Any]:
    return next(iter(get_dataloader(data, batch_size=size, shuffle=False)))


def transformer(data, seed: int = 0, layers: int = 2):
    from pyhealth.models import Transformer

    torch.manual_seed(seed)
    return Transformer(data, embedding_dim=8, heads=2, num_layers=layers).eval()


def stage_attention_net(data, seed: int = 0):
    from pyhealth.models import StageAttentionNet

    torch.manual_seed(seed)
    return StageAttentionNet(data, embedding_dim=8, chunk_size=4, levels=2, num_heads=2).eval()


def value_of(model, key: str, batch: Mapping[str, Any]) -> Tensor:
    """The value tensor of feature ``key`` in ``batch``."""
    feature = batch[key]
    if isinstance(feature, Tensor):
        return feature
    schema = model.dataset.input_processors[key].schema()
    return feature[schema.index("value")]


def as_float64(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(as_float64(v) for v in value)
    return value


def explained_index(logits: Tensor, target_class_idx: int | None) -> Tensor:
    """PyHealth's ``BaseInterpreter._resolve_target_indices``, restated."""
    if logits.shape[-1] == 1:
        return torch.zeros(logits.shape[0], dtype=torch.long)
    if target_class_idx is not None:
        return torch.full((logits.shape[0],), target_class_idx, dtype=torch.long)
    return logits.argmax(-1)


def chefer_rows(layers: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``R_L`` of REFERENCE §1 from ``(A, dA)`` per layer, ``(B, N, N)``."""
    size = layers[0][0].shape[-1]
    relevance = torch.eye(size, dtype=torch.float64).expand(layers[0][0].shape[0], size, size)
    for attention, grad in layers:
        weighted = (grad * attention).clamp(min=0).mean(1)
        relevance = relevance + weighted @ relevance
    return relevance


def spread(row: Tensor, value: Tensor) -> Tensor:
    """Token ``t``'s relevance on every entry of ``value[:, t]``; one token over everything."""
    if value.dim() >= 2 and value.shape[1] == row.shape[1]:
        return row.reshape(*row.shape, *[1] * (value.dim() - 2)).expand(value.shape)
    assert row.shape[1] == 1, (row.shape, value.shape)
    return row.reshape(row.shape[0], *[1] * (value.dim() - 1)).expand(value.shape)


def hooked_reference(model, batch, target_class_idx=None) -> dict[str, Tensor]:
    """Chefer's map in float64 for each feature of PyHealth's ``Transformer``, from its hooks.

    Each feature's ``TransformerLayer`` returns ``x[:, 0]`` to the head: row 0 is read.
    """
    layers, _ = hooked_layers(model, batch, target_class_idx)
    return {
        key: spread(chefer_rows(pairs)[:, 0], value_of(model, key, batch)).float()
        for key, pairs in layers.items()
    }


def hooked_layers(model, batch, target_class_idx=None):
    """``({feature: [(A, dA), …]}, logits)`` of a float64 copy, through PyHealth's hooks."""
    double = copy.deepcopy(model).double()
    batch64 = {key: as_float64(value) for key, value in batch.items()}
    double.set_attention_hooks(True)
    try:
        logits = double(**batch64)["logit"]
    finally:
        double.set_attention_hooks(False)
    index = explained_index(logits, target_class_idx)
    logits.gather(1, index[:, None]).sum().backward()
    layers = {
        key: [(a.double(), g.double()) for a, g in pairs]
        for key, pairs in double.get_attention_layers().items()
    }
    return layers, logits.detach()


def vit_reference(vit: nn.Module, images: Tensor, target_class_idx: int | None) -> Tensor:
    """Chefer's map in float64 for torchvision's ``VisionTransformer`` ``vit``, laid on the image.

    The forward is written out (patch projection, class token, position embeddings, pre-norm
    blocks with the attention formed explicitly, final norm, head on the class token); the map
    is the class token's row without its own column, on the patch grid, upsampled bilinearly.
    """
    vit = copy.deepcopy(vit).double().eval()
    x = images.double()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    patches = vit.conv_proj(x)
    grid = patches.shape[-2:]
    tokens = patches.flatten(2).transpose(1, 2)
    tokens = torch.cat([vit.class_token.expand(len(x), -1, -1), tokens], dim=1)
    tokens = tokens + vit.encoder.pos_embedding
    maps = []
    for block in vit.encoder.layers:
        mixed, attention = _explicit_attention(block.self_attention, block.ln_1(tokens))
        attention.retain_grad()
        maps.append(attention)
        tokens = tokens + mixed
        tokens = tokens + block.mlp(block.ln_2(tokens))
    logits = vit.heads(vit.encoder.ln(tokens)[:, 0])
    assert torch.allclose(logits, vit(x), atol=1e-10), "the written-out forward is not the model's"
    index = explained_index(logits, target_class_idx)
    logits.gather(1, index[:, None]).sum().backward()
    rows = chefer_rows([(a.detach(), a.grad) for a in maps])[:, 0, 1:]
    patch_map = rows.reshape(len(x), 1, *grid)
    upsampled = F.interpolate(
        patch_map, size=images.shape[-2:], mode="bilinear", align_corners=False
    )
    return upsampled.expand(images.shape).float()


def _explicit_attention(attention: nn.MultiheadAttention, x: Tensor) -> tuple[Tensor, Tensor]:
    batch, size, width = x.shape
    heads = attention.num_heads
    q, k, v = F.linear(x, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, size, heads, -1).transpose(1, 2) for t in (q, k, v))
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    mixed = (probs @ v).transpose(1, 2).reshape(batch, size, width)
    return attention.out_proj(mixed), probs


def image_dataset(folder, task: str = "multiclass", n: int = 4, size: int = 32, seed: int = 0):
    """PNG files of random pixels, read by PyHealth's image processor at ``size``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        path = folder / f"image{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        samples.append({"patient_id": f"p{i}", "image": str(path), "label": label(task, i, None)})
    schema = {"image": ("image", {"image_size": size, "mode": "RGB"})}
    return create_sample_dataset(samples, schema, {"label": task}, dataset_name="images")


def torchvision_vit(data, seed: int = 0, size: int = 32):
    from pyhealth.models import TorchvisionModel

    torch.manual_seed(seed)
    config = {"weights": None, "image_size": size}
    return TorchvisionModel(data, "vit_b_16", config).eval()
