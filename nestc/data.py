"""Training data: the embedded default corpus, byte-level, with a fixed held-out split."""

from __future__ import annotations

import math
from collections import Counter

HELD_OUT = 0.1  # the last tenth of the corpus is the validation split, always the same bytes


def default_corpus() -> bytes:
    """The English documentation that ships with CPython (`pydoc_data.topics`, about 460 KB):
    present on every machine with Python, so a run needs no download."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics)).encode("utf-8")


def split(data: bytes, held_out: float = HELD_OUT) -> tuple[bytes, bytes]:
    cut = int(len(data) * (1 - held_out))
    return data[:cut], data[cut:]


def unigram_bits_per_byte(train: bytes, evaluate: bytes) -> float:
    """Cross-entropy of the evaluation bytes under the training bytes' frequencies (add-one
    smoothed): the score a model must beat to have learned anything beyond byte counts."""
    counts = Counter(train)
    total = len(train) + 256
    return -sum(math.log2((counts.get(b, 0) + 1) / total) for b in evaluate) / len(evaluate)
