"""Training data: the embedded default corpus, byte-level, with a fixed held-out split."""

from __future__ import annotations

import glob
import math
import os
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


def unigram_bits(train, evaluate, vocab: int = 256) -> float:
    """Cross-entropy (bits per symbol) of the evaluation symbols under the training symbols'
    frequencies (add-one smoothed): the score a model must beat to have learned anything beyond
    symbol counts. Symbols are bytes, or token ids with a tokenizer."""
    counts = Counter(train)
    total = len(train) + vocab
    return -sum(math.log2((counts.get(b, 0) + 1) / total) for b in evaluate) / len(evaluate)


def tokenize(text: bytes, path: str) -> tuple[list[int], object]:
    """Token ids of `text` under a `tokenizers` tokenizer file, and the tokenizer."""
    tokenizer = load_tokenizer(path)
    return tokenizer.encode(text.decode("utf-8", "replace")).ids, tokenizer


def load_tokenizer(path: str):
    """A `tokenizers` tokenizer file, read."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError("--tokenizer needs the `tokenizers` package: pip install tokenizers") from None
    try:
        return Tokenizer.from_file(path)
    except Exception as error:  # tokenizers raises its own exception types for unreadable files
        raise DataError(f"--tokenizer {path}: not a tokenizer file ({error})") from None


class DataError(ValueError):
    """Paths that name no readable text."""


def load_paths(patterns: list[str]) -> bytes:
    """The bytes of every file named by `patterns` (files, globs, directories, searched
    recursively), in sorted path order so a run is reproducible, separated by blank lines."""
    files: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = [os.path.join(root, name) for root, _, names in os.walk(pattern) for name in names]
        else:
            found = glob.glob(pattern, recursive=True)
        found = sorted(path for path in found if os.path.isfile(path))
        if not found:
            raise DataError(f"--data {pattern}: no such file, directory or matching files")
        files.extend(found)
    chunks = []
    for path in dict.fromkeys(files):
        try:
            with open(path, "rb") as handle:
                chunks.append(handle.read())
        except OSError as error:
            raise DataError(f"--data: cannot read `{path}`: {error.strerror}") from None
    data = b"\n\n".join(chunks)
    if len(data) < 1024:
        raise DataError(f"--data: only {len(data)} bytes of text; a run needs at least 1 KB")
    return data
