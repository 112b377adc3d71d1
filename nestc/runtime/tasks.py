"""Built-in tasks, generated locally: associative recall, formal languages, needle in a haystack.

Every task makes batches of token sequences (ids below 256, so any byte-level model reads them)
with a mask of the positions whose next token is scored, and a held-out split that is longer than
training where length generalisation is the point. Generation is deterministic under a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

ACCEPT, REJECT, QUERY, PAD = 250, 251, 252, 253  # special tokens: answers and separators
VOCAB_NEEDED = PAD + 1  # every task's token ids stay below this


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T]
    scored: torch.Tensor  # [B, T] bool: the next token after this position is a target


class Task:
    name = ""

    def __init__(self, length: int, test_length: int | None = None):
        self.length = length
        self.test_length = test_length or length

    def example(self, rng: random.Random, length: int) -> tuple[list[int], list[int]]:
        """(tokens, indices whose next token is a target)."""
        raise NotImplementedError

    def batch(self, rng: random.Random, size: int, held_out: bool = False) -> Batch:
        length = self.test_length if held_out else self.length
        rows, masks = [], []
        for _ in range(size):
            tokens, targets = self.example(rng, length)
            tokens = (tokens + [PAD] * length)[:length]
            mask = [False] * length
            for index in targets:
                if index < length - 1:
                    mask[index] = True
            rows.append(tokens)
            masks.append(mask)
        return Batch(torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.bool))


class AssociativeRecall(Task):
    """Multi-query associative recall (Zoology): key-value pairs, then keys to be answered with
    their values. Keys and values come from disjoint ranges of the vocabulary."""

    name = "mqar"

    def __init__(self, length: int = 64, pairs: int = 8, keys: int = 64, values: int = 64, test_length=None):
        super().__init__(length, test_length)
        self.pairs, self.keys, self.values = pairs, keys, values

    def example(self, rng, length):
        pairs = min(self.pairs, max(1, (length - 2) // 4))
        keys = rng.sample(range(self.keys), pairs)
        values = [self.keys + rng.randrange(self.values) for _ in keys]
        tokens = [t for pair in zip(keys, values) for t in pair] + [QUERY]
        targets = []
        for index in rng.sample(range(pairs), pairs):
            tokens.append(keys[index])
            targets.append(len(tokens) - 1)  # after the key comes its value
            tokens.append(values[index])
        return tokens, targets


class Language(Task):
    """Recognition of a formal language (Nested Learning, Table 5): a string over small symbols,
    then the answer ACCEPT or REJECT after a QUERY token. Half the examples are members."""

    alphabet = "ab"

    def member(self, rng, size: int) -> str:
        raise NotImplementedError

    def accepts(self, text: str) -> bool:
        raise NotImplementedError

    def example(self, rng, length):
        size = rng.randrange(1, max(2, length - 2))
        if rng.random() < 0.5:
            text = self.member(rng, size)
        else:  # a random string that does not belong (random strings of parity belong half the time)
            for _ in range(20):
                text = "".join(rng.choice(self.alphabet) for _ in range(size))
                if not self.accepts(text):
                    break
        text = text[:length - 2]  # the label below is computed after any truncation
        answer = ACCEPT if self.accepts(text) else REJECT
        tokens = [ord(c) for c in text] + [QUERY, answer]
        return tokens, [len(tokens) - 2]


class Parity(Language):
    name = "parity"
    alphabet = "01"

    def member(self, rng, size):
        bits = "".join(rng.choice("01") for _ in range(size - 1))
        return bits + ("1" if bits.count("1") % 2 else "0")

    def accepts(self, text):
        return text.count("1") % 2 == 0


class EvenA(Language):
    name = "aa_star"
    alphabet = "a"

    def example(self, rng, length):  # every length is equally likely: half the strings belong
        size = rng.randrange(0, max(1, length - 2))
        text = "a" * size
        tokens = [ord(c) for c in text] + [QUERY, ACCEPT if self.accepts(text) else REJECT]
        return tokens, [len(tokens) - 2]

    def accepts(self, text):
        return set(text) <= {"a"} and len(text) % 2 == 0


class Abab(Language):
    name = "abab_star"

    def member(self, rng, size):
        return "abab" * max(1, size // 4)

    def accepts(self, text):
        return len(text) % 4 == 0 and text == "abab" * (len(text) // 4)


class AnBn(Language):
    name = "anbn"

    def member(self, rng, size):
        n = max(1, size // 2)
        return "a" * n + "b" * n

    def accepts(self, text):
        n = len(text) // 2
        return len(text) % 2 == 0 and n > 0 and text == "a" * n + "b" * n


class AnBnCn(Language):
    name = "anbncn"
    alphabet = "abc"

    def member(self, rng, size):
        n = max(1, size // 3)
        return "a" * n + "b" * n + "c" * n

    def accepts(self, text):
        n = len(text) // 3
        return len(text) % 3 == 0 and n > 0 and text == "a" * n + "b" * n + "c" * n


class Shuffle2(Language):
    """Interleavings of two balanced bracket languages, () and []: each kind balanced on its own."""

    name = "shuffle2"
    alphabet = "()[]"

    def member(self, rng, size):
        out, depth = [], {"(": 0, "[": 0}
        for _ in range(max(2, size)):
            kind = rng.choice("([")
            closer = ")" if kind == "(" else "]"
            if depth[kind] and rng.random() < 0.5:
                out.append(closer)
                depth[kind] -= 1
            else:
                out.append(kind)
                depth[kind] += 1
        out += [")"] * depth["("] + ["]"] * depth["["]
        return "".join(out)

    def accepts(self, text):
        for opener, closer in ("()", "[]"):
            depth = 0
            for c in text:
                depth += (c == opener) - (c == closer)
                if depth < 0:
                    return False
            if depth:
                return False
        return bool(text)


class Passkey(Task):
    """Single needle in a haystack: a five-digit pass key hidden in filler text, asked for at the end."""

    name = "niah"
    filler = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

    def example(self, rng, length):
        key = "".join(rng.choice("0123456789") for _ in range(5)).encode()
        needle = b" The pass key is " + key + b". Remember it. "
        question = b" What is the pass key? The pass key is "
        room = max(0, length - len(needle) - len(question) - len(key))
        haystack = (self.filler * (room // len(self.filler) + 1))[:room]
        where = rng.randrange(0, len(haystack) + 1)
        text = haystack[:where] + needle + haystack[where:] + question + key
        start = len(text) - len(key) - 1
        return list(text), list(range(start, start + len(key)))


TASKS = {task.name: task for task in (AssociativeRecall, Parity, EvenA, Abab, AnBn, AnBnCn, Shuffle2, Passkey)}


OPTIONS = {"mqar": ("pairs", "keys", "values")}  # the Zoology settings; the length is the context


def make(name: str, length: int, options: dict[str, int] | None = None) -> Task:
    """A task at training length `length`, tested at twice that length where lengths generalise."""
    options = dict(options or {})
    unknown = set(options) - set(OPTIONS.get(name, ()))
    if unknown:
        allowed = ", ".join(OPTIONS.get(name, ())) or "none"
        raise ValueError(f"task `{name}` has no option {', '.join(sorted(unknown))} (options: {allowed})")
    small = {key: value for key, value in options.items() if value < 1}
    if small:
        key, value = next(iter(small.items()))
        raise ValueError(f"task `{name}`: --task-option {key}={value}, but {key} must be at least 1")
    cls = TASKS[name]
    if cls is AssociativeRecall:
        task = AssociativeRecall(length=length, **options)
        if task.keys < task.pairs:
            raise ValueError(f"mqar: {task.pairs} pairs need at least as many distinct keys, but keys={task.keys}")
        if task.keys + task.values > ACCEPT:
            raise ValueError(f"mqar: keys + values ({task.keys + task.values}) must stay below {ACCEPT}")
        return task
    return cls(length=length, test_length=2 * length)
