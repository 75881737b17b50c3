"""Seeded synthetic tasks with known evidence (torch only), for tutorials and benchmarks."""

from .synthetic import (
    COLOURS,
    ImageSet,
    MeanPoolClassifier,
    SentenceSet,
    accuracy,
    make_images,
    make_sentences,
    small_vit,
    train_text_head,
    train_vit,
)

__all__ = [
    "COLOURS",
    "ImageSet",
    "MeanPoolClassifier",
    "SentenceSet",
    "accuracy",
    "make_images",
    "make_sentences",
    "small_vit",
    "train_text_head",
    "train_vit",
]
