"""The synthetic tasks now live in :mod:`captum_chefer.datasets.synthetic`; re-exported here."""

from captum_chefer.datasets.synthetic import (  # noqa: F401
    COLOURS,
    DISTRACTOR_COLOURS,
    FILLER,
    NEGATIVE,
    POSITIVE,
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
from captum_chefer.pretrained import load_minilm  # noqa: F401
