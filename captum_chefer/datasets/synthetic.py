"""Synthetic tasks whose evidence is known, for the tutorials and the ground-truth benchmark.

- **Vision.** A 32×32 noisy grey background holds one coloured object (a square or a disc at a
  random, not patch-aligned position) and a distractor of the same kind in a colour that is
  never a class colour (magenta, cyan, white), so a class-agnostic map that finds "the salient
  objects" is wrong half the time. The class is the object's colour; its pixel mask is the
  ground truth. :func:`small_vit` (timm, 4 layers, width 64, 4×4 patches, CLS read-out) learns
  it from scratch in about a minute on a CPU.
- **Text.** Sentences of neutral filler words with one or two sentiment keywords inserted at
  random positions; the label is the keywords' sentiment and their tokens are the ground truth.
  :class:`MeanPoolClassifier` puts a trained linear head on a frozen encoder, e.g. the
  pretrained MiniLM of :func:`captum_chefer.pretrained.load_minilm`.

Everything is seeded: the same seed gives the same data, weights and predictions. The module
imports torch only; timm is imported inside :func:`small_vit`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

COLOURS = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.20, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
"""Class index → object colour (RGB in [0, 1]) of the vision task."""

DISTRACTOR_COLOURS = ((0.85, 0.20, 0.85), (0.15, 0.85, 0.85), (0.95, 0.95, 0.95))
"""Colours of the distractor object: as salient as the object, but never a class colour."""

POSITIVE = ("excellent", "wonderful", "brilliant", "delightful", "superb", "fantastic", "lovely")
NEGATIVE = ("terrible", "awful", "horrible", "dreadful", "boring", "disappointing", "dull")
FILLER = (
    "the", "a", "film", "movie", "story", "we", "saw", "it", "on", "saturday", "with", "my",
    "friends", "and", "then", "went", "home", "after", "dinner", "in", "town", "this", "was",
    "about", "an", "old", "house", "near", "river", "actors", "people", "seemed", "quite",
    "really", "some", "scenes", "long", "music", "evening", "cinema", "ticket", "seat",
)  # fmt: skip
"""Neutral words; the label is carried only by the keywords (label 1 = ``POSITIVE``)."""


@dataclass
class ImageSet:
    """Images ``(n, 3, S, S)`` in [0, 1], labels ``(n,)`` and object masks ``(n, S, S)`` bool."""

    images: Tensor
    labels: Tensor
    masks: Tensor


def make_images(n: int, seed: int, size: int = 32) -> ImageSet:
    """``n`` images of the vision task, drawn from ``torch.Generator().manual_seed(seed)``.

    Example:
        >>> data = make_images(4, seed=0)
        >>> tuple(data.images.shape), tuple(data.masks.shape), data.labels.tolist()
        ((4, 3, 32, 32), (4, 32, 32), [3, 1, 1, 3])
        >>> bool(data.masks.flatten(1).any(1).all())  # every image holds its object
        True
    """
    g = torch.Generator().manual_seed(seed)
    images = (0.45 + 0.12 * torch.randn(n, 1, size, size, generator=g)).expand(n, 3, size, size)
    images = images + 0.05 * torch.randn(n, 3, size, size, generator=g)
    labels = torch.randint(len(COLOURS), (n,), generator=g)
    radius = 3 + 2 * torch.rand(n, generator=g)
    centre = radius[:, None] + (size - 1 - 2 * radius[:, None]) * torch.rand(n, 2, generator=g)
    mask = _shape_masks(centre, radius, torch.rand(n, generator=g) < 0.5, size)
    other = _distractor_centres(centre, radius, size, g)
    other_radius = 3 + 2 * torch.rand(n, generator=g)
    distractor = _shape_masks(other, other_radius, torch.rand(n, generator=g) < 0.5, size)
    palette = torch.tensor(DISTRACTOR_COLOURS)
    decoy = palette[torch.randint(len(palette), (n,), generator=g)][:, :, None, None]
    colour = torch.tensor(list(COLOURS.values()))[labels][:, :, None, None]
    colour = colour + 0.05 * torch.randn(n, 3, 1, 1, generator=g)
    images = torch.where(distractor[:, None], decoy, images)
    images = torch.where(mask[:, None], colour, images)
    return ImageSet(images.clamp(0, 1).contiguous(), labels, mask)


def _shape_masks(centre: Tensor, radius: Tensor, square: Tensor, size: int) -> Tensor:
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    dy = grid[None, :, None] - centre[:, 0, None, None]
    dx = grid[None, None, :] - centre[:, 1, None, None]
    r = radius[:, None, None]
    is_square = (dy.abs() <= r * 0.9) & (dx.abs() <= r * 0.9)
    is_disc = dy**2 + dx**2 <= r**2
    return torch.where(square[:, None, None], is_square, is_disc)


def _distractor_centres(centre: Tensor, radius: Tensor, size: int, g: torch.Generator) -> Tensor:
    """Centres at least ``radius + 6`` away from the object's (rejection sampling)."""
    other = torch.empty_like(centre)
    pending = torch.ones(len(centre), dtype=torch.bool)
    while pending.any():
        candidate = 5 + (size - 10) * torch.rand(len(centre), 2, generator=g)
        far = (candidate - centre).norm(dim=1) > radius + 6
        take = pending & far
        other[take] = candidate[take]
        pending &= ~far
    return other


def small_vit(num_classes: int = len(COLOURS), size: int = 32, seed: int = 0) -> nn.Module:
    """A random-init timm ``VisionTransformer``: 4×4 patches, 4 layers, width 64, 4 heads.

    Example:
        >>> tuple(small_vit()(make_images(2, seed=0).images).shape)
        (2, 4)
    """
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=size,
        patch_size=4,
        num_classes=num_classes,
        embed_dim=64,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
    )


def train_vit(
    model: nn.Module,
    data: ImageSet,
    steps: int,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    log: Callable[[str], None] = print,
) -> nn.Module:
    """Train ``model`` with AdamW, warmup and cosine decay, on random batches of ``data``.

    Returns the model in eval mode.
    """
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    for step in range(steps):
        index = torch.randint(len(data.labels), (batch_size,), generator=g)
        images = _augment(data.images[index], g)
        loss = F.cross_entropy(model(images), data.labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            log(f"  step {step + 1:4d}/{steps}  loss {loss.item():.3f}")
    return model.eval()


def _augment(images: Tensor, g: torch.Generator) -> Tensor:
    """Random horizontal and vertical flips (the object moves, the mask is not needed)."""
    flip = torch.rand(2, generator=g)
    if flip[0] < 0.5:
        images = images.flip(-1)
    if flip[1] < 0.5:
        images = images.flip(-2)
    return images


@torch.no_grad()
def accuracy(
    model: Callable[..., Tensor], *inputs: Tensor, labels: Tensor, batch: int = 256
) -> float:
    """Top-1 accuracy of ``model(*inputs)`` against ``labels``, in batches.

    Example:
        >>> accuracy(lambda x: x, torch.eye(3), labels=torch.tensor([0, 1, 0]))
        0.6666666666666666
    """
    correct = 0
    for start in range(0, len(labels), batch):
        chunk = [tensor[start : start + batch] for tensor in inputs]
        correct += int((model(*chunk).argmax(1) == labels[start : start + batch]).sum())
    return correct / len(labels)


@dataclass
class SentenceSet:
    """Tokenised sentences: ids and attention mask ``(n, T)``, labels ``(n,)``, the keyword
    tokens ``(n, T)`` bool (the ground truth), the special tokens ``(n, T)`` bool, the words."""

    ids: Tensor
    mask: Tensor
    labels: Tensor
    evidence: Tensor
    special: Tensor
    sentences: list[str]


def make_sentences(n: int, seed: int, tokenizer: Any) -> SentenceSet:
    """``n`` sentences of 6 to 10 filler words with 1 or 2 keywords of the label's sentiment.

    Args:
        n: how many sentences.
        seed: seeds ``random.Random``; the same seed gives the same sentences.
        tokenizer: a Hugging Face (fast) tokenizer; the batch is padded to its longest row.

    Example:
        >>> from captum_chefer.pretrained import load_minilm
        >>> _, tokenizer = load_minilm()
        >>> data = make_sentences(2, seed=0, tokenizer=tokenizer)
        >>> row = data.ids[0][data.evidence[0]]
        >>> all(tokenizer.decode(t) in POSITIVE + NEGATIVE for t in row)
        True
    """
    rng = random.Random(seed)
    words: list[list[str]] = []
    keyword_positions: list[set[int]] = []
    labels: list[int] = []
    for _ in range(n):
        label = rng.randrange(2)
        sentence = [rng.choice(FILLER) for _ in range(rng.randint(6, 10))]
        positions: list[int] = []
        for _ in range(rng.randint(1, 2)):
            at = rng.randint(0, len(sentence))
            sentence.insert(at, rng.choice(POSITIVE if label else NEGATIVE))
            positions = [p + (p >= at) for p in positions] + [at]
        words.append(sentence)
        keyword_positions.append(set(positions))
        labels.append(label)
    batch = tokenizer(words, is_split_into_words=True, padding=True, return_tensors="pt")
    evidence = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for row, keywords in enumerate(keyword_positions):
        for column, word in enumerate(batch.word_ids(row)):
            evidence[row, column] = word is not None and word in keywords
    specials = torch.tensor(tokenizer.all_special_ids)
    special = torch.isin(batch["input_ids"], specials)
    sentences = [" ".join(sentence) for sentence in words]
    return SentenceSet(
        batch["input_ids"], batch["attention_mask"], torch.tensor(labels), evidence, special,
        sentences,
    )  # fmt: skip


class MeanPoolClassifier(nn.Module):
    """``encoder`` → mask-aware mean of the last hidden states → linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        hidden_size = int(encoder.config.hidden_size)  # type: ignore[union-attr, arg-type]
        self.head = nn.Linear(hidden_size, num_classes)

    def pool(self, ids: Tensor, mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.head(self.pool(ids, mask))


def train_text_head(
    classifier: MeanPoolClassifier,
    data: SentenceSet,
    epochs: int = 300,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> MeanPoolClassifier:
    """Fit the linear head on frozen pooled features (full-batch Adam); the encoder is unchanged."""
    torch.manual_seed(seed)
    with torch.no_grad():
        features = torch.cat(
            [
                classifier.pool(data.ids[i : i + 128], data.mask[i : i + 128])
                for i in range(0, len(data.labels), 128)
            ]
        )
    optimizer = torch.optim.Adam(classifier.head.parameters(), lr=1e-2)
    for epoch in range(epochs):
        loss = F.cross_entropy(classifier.head(features), data.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (epoch + 1) % max(1, epochs // 5) == 0:
            log(f"  epoch {epoch + 1:4d}/{epochs}  loss {loss.item():.4f}")
    return classifier.eval()
