"""Training data: the embedded default corpus, text files, pre-tokenized token files and Hugging
Face datasets. Whatever the source, a run reads one sequence of symbols (a 1-D integer tensor:
bytes, or token ids, a token file's memory-mapped in place) with a fixed held-out split."""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HELD_OUT = 0.1  # the last tenth of the corpus is the validation split, always the same symbols
# The id types of pre-tokenized token files, by how the file name ends (the longest match wins):
# a bare `.bin` is uint16, the convention of nanoGPT's `prepare.py` files.
TOKEN_FILE_TYPES = {".u16.bin": torch.uint16, ".u32.bin": torch.uint32, ".bin": torch.uint16}
SCAN_CHUNK = 1 << 22  # ids read at a time when a whole sequence is scanned (largest id, counts): bounded memory
HF_PREFIX = "hf:"
# A streamed dataset is read until the run's every training window could be a fresh one (steps x
# batch x context symbols, plus the held-out tenth), within these bounds.
HF_BYTES_AT_LEAST, HF_BYTES_AT_MOST = 1 << 16, 1 << 28


class DataError(ValueError):
    """Data that cannot be read, or cannot be trained on."""


@dataclass(frozen=True)
class Corpus:
    """What a run trains on and where it came from (named in errors)."""

    symbols: bytes | torch.Tensor  # text as bytes, or token ids (a 1-D integer tensor)
    origin: str

    @property
    def tokenized(self) -> bool:
        """Token ids already (a token file): a tokenizer only decodes them."""
        return isinstance(self.symbols, torch.Tensor)


def default_corpus() -> bytes:
    """The English documentation that ships with CPython (`pydoc_data.topics`, about 460 KB):
    present on every machine with Python, so a run needs no download."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics)).encode("utf-8")


def as_sequence(symbols) -> torch.Tensor:
    """Bytes or a list of token ids as a 1-D tensor (a tensor is returned as it is): slicing it
    makes views, so windows of a memory-mapped file are read only when a batch needs them."""
    if isinstance(symbols, torch.Tensor):
        return symbols
    if isinstance(symbols, (bytes, bytearray)):
        return torch.frombuffer(bytearray(symbols), dtype=torch.uint8)
    return torch.tensor(symbols, dtype=torch.int64)


def split(data, held_out: float = HELD_OUT):
    cut = int(len(data) * (1 - held_out))
    return data[:cut], data[cut:]


def windows(sequence: torch.Tensor, starts, length: int) -> torch.Tensor:
    """The `length`-symbol windows of `sequence` at `starts`, as a [len(starts), length] batch of
    int64 ids (of a memory-mapped file, only these windows are read)."""
    return torch.stack([sequence[start:start + length] for start in starts]).long()


def largest(sequence: torch.Tensor) -> int:
    """The largest id in `sequence`, read a chunk at a time."""
    return max(int(sequence[i:i + SCAN_CHUNK].long().max()) for i in range(0, len(sequence), SCAN_CHUNK))


def counts(sequence: torch.Tensor, at_least: int) -> torch.Tensor:
    """How often each id occurs in `sequence` (at least `at_least` entries, more if its ids reach
    further), read a chunk at a time."""
    total = torch.zeros(at_least, dtype=torch.int64)
    for i in range(0, len(sequence), SCAN_CHUNK):
        found = torch.bincount(sequence[i:i + SCAN_CHUNK].long(), minlength=len(total))
        total = F.pad(total, (0, len(found) - len(total))) + found
    return total


def unigram_bits(train, evaluate, vocab: int = 256) -> float:
    """Cross-entropy (bits per symbol) of the evaluation symbols under the training symbols'
    frequencies (add-one smoothed): the score a model must beat to have learned anything beyond
    symbol counts. Symbols are bytes, or token ids with a tokenizer or a token file."""
    train, evaluate = as_sequence(train), as_sequence(evaluate)
    seen = counts(train, vocab)
    scored = counts(evaluate, len(seen))
    probabilities = (F.pad(seen, (0, len(scored) - len(seen))).double() + 1) / (len(train) + vocab)
    return -(scored.double() * probabilities.log2()).sum().item() / len(evaluate)


def token_numbers(ids) -> bytes:
    """Token ids written as numbers: the text of a token file's run that has no tokenizer to decode them."""
    return " ".join(str(int(i)) for i in ids).encode()


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


def load(sources: list[str], wanted_bytes: int = HF_BYTES_AT_LEAST) -> Corpus:
    """What `--data` names: text files (files, globs, directories), one token file, or one Hugging
    Face dataset (`hf:...`, read until it holds `wanted_bytes` of text, within the HF_ bounds)."""
    special = [source for source in sources if source.startswith(HF_PREFIX) or token_file_type(source)]
    if special and len(sources) > 1:
        raise DataError(f"--data {special[0]}: a token file or a dataset is a run's only --data; "
                        f"it cannot be combined with {', '.join(s for s in sources if s != special[0])}")
    if special and special[0].startswith(HF_PREFIX):
        return load_hugging_face(special[0], wanted_bytes)
    if special:
        return load_token_file(special[0])
    return Corpus(load_paths(sources), "--data " + " ".join(sources))


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
    return _enough_text(b"\n\n".join(chunks))


def _enough_text(data: bytes) -> bytes:
    if len(data) < 1024:
        raise DataError(f"--data: only {len(data)} bytes of text; a run needs at least 1 KB")
    return data


def token_file_type(path: str) -> torch.dtype | None:
    """The id type of a token file named `path` (None: not a token file's name)."""
    for suffix, dtype in TOKEN_FILE_TYPES.items():
        if path.endswith(suffix):
            return dtype
    return None


def load_token_file(path: str) -> Corpus:
    """A file of token ids, native byte order, no header, mapped into memory (copy-on-write, so
    pages are read only as batches touch them and nothing is ever written back)."""
    dtype = token_file_type(path)
    width = dtype.itemsize
    try:
        size = os.path.getsize(path)
    except OSError as error:
        raise DataError(f"--data {path}: cannot read it: {error.strerror}") from None
    kind = f"uint{8 * width}"
    if size == 0:
        raise DataError(f"--data {path}: the token file is empty")
    if size % width:
        raise DataError(f"--data {path}: {size} bytes is not a whole number of {kind} token ids "
                        f"({width} bytes each); name a uint32 file `.u32.bin`, a uint16 one `.bin` or `.u16.bin`")
    try:
        ids = torch.from_file(path, shared=False, size=size // width, dtype=dtype)
    except RuntimeError as error:
        raise DataError(f"--data {path}: cannot map it: {error}") from None
    return Corpus(ids, f"--data {path}")


def parse_hugging_face(source: str) -> tuple[str, str | None, str, str]:
    """`hf:NAME_OR_PATH[:SPLIT[:COLUMN]]`, SPLIT optionally `CONFIG/SPLIT`: (name, config, split,
    column); the split defaults to `train` and the column to `text`."""
    name, *rest = source[len(HF_PREFIX):].split(":")
    if not name or len(rest) > 2 or any(not part for part in rest):
        raise DataError(f"--data {source}: write a dataset as hf:NAME_OR_PATH[:SPLIT[:COLUMN]] "
                        "(SPLIT may be CONFIG/SPLIT), e.g. hf:wikitext:wikitext-2-raw-v1/train:text")
    split_name, column = (rest + ["train", "text"][len(rest):])[:2]
    config, _, split_name = split_name.rpartition("/")
    return name, config or None, split_name, column


# A local data file is streamed by the `datasets` builder of its kind.
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text", ".parquet": "parquet"}


def _stream(datasets, name: str, config: str | None, split_name: str):
    """The records of a dataset split, one at a time: a local data file by its builder, a
    directory written by `save_to_disk` through its memory-mapped Arrow files, anything else
    (a hub name, a directory of data files) through `load_dataset(streaming=True)`."""
    builder = _FILE_BUILDERS.get(os.path.splitext(name)[1]) if os.path.isfile(name) else None
    if builder is not None:
        return datasets.load_dataset(builder, data_files=name, split=split_name, streaming=True)
    if os.path.isfile(os.path.join(name, "dataset_dict.json")):
        saved = datasets.load_from_disk(name)
        if split_name not in saved:
            raise DataError(f"--data hf:{name}: the saved dataset has no split `{split_name}` "
                            f"(its splits: {', '.join(saved)})")
        return saved[split_name].to_iterable_dataset()
    if os.path.isfile(os.path.join(name, "state.json")):  # one split saved on its own
        return datasets.load_from_disk(name).to_iterable_dataset()
    return datasets.load_dataset(name, config, split=split_name, streaming=True)


def load_hugging_face(source: str, wanted_bytes: int) -> Corpus:
    """The texts of a Hugging Face dataset (a hub name, a local dataset directory or data file),
    streamed: documents are taken until the buffer holds `wanted_bytes` (within the HF_ bounds),
    so the dataset is never downloaded or read whole."""
    name, config, split_name, column = parse_hugging_face(source)
    try:
        import datasets
    except ImportError:
        raise DataError(f"--data {source}: datasets need the `datasets` package: pip install 'nestc[data]'") from None
    wanted = min(max(wanted_bytes, HF_BYTES_AT_LEAST), HF_BYTES_AT_MOST)
    documents, size = [], 0
    try:
        for record in _stream(datasets, name, config, split_name):
            if column not in record:
                raise DataError(f"--data {source}: the dataset has no column `{column}` "
                                f"(its columns: {', '.join(record)}); name one as hf:{name}:{split_name}:COLUMN")
            text = record[column]
            if not isinstance(text, str):
                raise DataError(f"--data {source}: column `{column}` holds {type(text).__name__}, not text")
            documents.append(text.encode("utf-8"))
            size += len(documents[-1]) + 2
            if size >= wanted:
                break
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 (datasets raises many kinds: missing, offline, bad split, bad file)
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"--data {source}: cannot load the dataset ({message})") from None
    return Corpus(_enough_text(b"\n\n".join(documents)), f"--data {source}")


def bytes_for(steps: int, batch: int, context: int) -> int:
    """The text a run's steps read if no window repeats, and the held-out tenth after it."""
    return math.ceil(steps * batch * context / (1 - HELD_OUT))
