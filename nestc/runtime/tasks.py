"""Built-in tasks, generated locally: associative recall, formal languages, needle in a haystack.

Every task makes batches of token sequences (ids below 256, so any byte-level model reads them)
with a mask of the positions whose next token is scored. Where length generalisation is the point
(the formal languages, the needle), the held-out evaluation also draws examples longer than any training
example, padded to `test_length`, and scores the two kinds apart. Generation is deterministic
under a seed.
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

    @classmethod
    def shortest_context(cls) -> int:
        """The shortest training length at which an example scores a token."""
        raise NotImplementedError

    @property
    def tests_longer(self) -> bool:
        """Whether the held-out evaluation also has examples longer than any training example."""
        return self.test_length > self.length

    def example(self, rng: random.Random, longer: bool) -> tuple[list[int], list[int]]:
        """(tokens, indices whose next token is a target): an example of the training lengths, or
        (`longer`) one longer than any of them that fits in `test_length`."""
        raise NotImplementedError

    def lengths(self, longer: bool) -> str:
        """What the examples of `example(rng, longer)` are, for the run's report."""
        return f"examples of length {self.test_length if longer else self.length}"

    def fitted(self, rng: random.Random, longer: bool) -> tuple[list[int], list[int]]:
        """An example cut to the length of its batches: the tokens that fit, the targets that do."""
        length = self.test_length if longer else self.length
        tokens, targets = self.example(rng, longer)
        return tokens[:length], [index for index in targets if index < length - 1]

    def batch(self, rng: random.Random, size: int, longer: bool = False) -> Batch:
        return pad([self.fitted(rng, longer) for _ in range(size)], self.test_length if longer else self.length)


def pad(examples: list[tuple[list[int], list[int]]], length: int) -> Batch:
    """Fitted examples as one batch of `length` tokens, PAD after each example's own."""
    rows = [tokens + [PAD] * (length - len(tokens)) for tokens, _ in examples]
    masks = [[False] * length for _ in examples]
    for mask, (_, targets) in zip(masks, examples):
        for index in targets:
            mask[index] = True
    return Batch(torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.bool))


class AssociativeRecall(Task):
    """Multi-query associative recall (Zoology): key-value pairs, then keys to be answered with
    their values. Keys and values come from disjoint ranges of the vocabulary. The held-out
    examples are drawn as the training ones are: recall is not tested at longer lengths."""

    name = "mqar"

    def __init__(self, length: int = 64, pairs: int = 8, keys: int = 64, values: int = 64, test_length=None):
        super().__init__(length, test_length)
        self.pairs, self.keys, self.values = pairs, keys, values

    @classmethod
    def shortest_context(cls):
        return 5  # one pair, QUERY, then its key, whose value is the target

    def example(self, rng, longer):
        pairs = min(self.pairs, max(1, (self.length - 2) // 4))
        keys = rng.sample(range(self.keys), pairs)
        values = [self.keys + rng.randrange(self.values) for _ in keys]
        tokens = [t for pair in zip(keys, values) for t in pair] + [QUERY]
        targets = []
        for index in rng.sample(range(pairs), pairs):
            tokens.append(keys[index])
            targets.append(len(tokens) - 1)  # after the key comes its value
            tokens.append(values[index])
        return tokens, targets


def one_edit(rng: random.Random, text: str, alphabet: str) -> str:
    """`text` after one random edit: a substitution, an insertion, a deletion, or a swap of two
    adjacent different symbols (each kind equally likely among those `text` allows)."""
    kinds = ["insert"]
    if text:
        kinds.append("delete")
        if len(alphabet) > 1:
            kinds.append("substitute")
    swappable = [i for i in range(len(text) - 1) if text[i] != text[i + 1]]
    if swappable:
        kinds.append("swap")
    kind = rng.choice(kinds)
    if kind == "insert":
        where = rng.randrange(len(text) + 1)
        return text[:where] + rng.choice(alphabet) + text[where:]
    if kind == "swap":
        where = rng.choice(swappable)
        return text[:where] + text[where + 1] + text[where] + text[where + 2:]
    where = rng.randrange(len(text))
    if kind == "delete":
        return text[:where] + text[where + 1:]
    return text[:where] + rng.choice([c for c in alphabet if c != text[where]]) + text[where + 1:]


class Language(Task):
    """Recognition of a formal language (Nested Learning, Table 5): a string over small symbols,
    then the answer ACCEPT or REJECT after a QUERY token.

    Half the strings are members, half near misses: a member after one edit (`one_edit`) or, half
    the time where the language has them, after one of its hard edits (`hard_negative`), the
    negatives no check of a few neighbouring symbols rejects. A near miss is kept only if the
    language's decider (`accepts`) rejects it, and the label is always the decider's. A uniform
    random string would not do: almost none belongs, and a local check rejects almost all.

    Training strings have 1 to `length - 2` symbols (the QUERY and the answer fill the rest); the
    held-out longer ones have `length - 1` to `test_length - 2`. Member lengths are drawn
    uniformly among the lengths members have in that range.
    """

    alphabet = "ab"
    step = 1  # members have lengths that are multiples of this ...
    empty_member = False  # ... and the empty string is a member or not

    @classmethod
    def shortest_context(cls) -> int:
        return cls.step + 2  # room for the shortest nonempty member, QUERY and the answer

    def member(self, rng: random.Random, size: int) -> str:
        """A member of exactly `size` symbols (one of `member_lengths`)."""
        raise NotImplementedError

    def accepts(self, text: str) -> bool:
        raise NotImplementedError

    def hard_negative(self, rng: random.Random, member: str) -> str | None:
        """A near miss made from `member` that a local check does not reject, or None where the
        language has none (a candidate that still belongs is drawn again)."""
        return None

    def member_lengths(self, low: int, high: int) -> list[int]:
        return [n for n in range(0, high + 1, self.step) if n >= low and (n or self.empty_member)]

    def span(self, longer: bool) -> tuple[int, int]:
        """The fewest and most symbols of a string: training lengths, or longer than all of them."""
        return (self.length - 1, self.test_length - 2) if longer else (1, self.length - 2)

    def lengths(self, longer):
        low, high = self.span(longer)
        return f"strings of {low} to {high} symbols"

    def near_miss(self, rng: random.Random, low: int, high: int) -> str:
        """A non-member of `low` to `high` symbols one edit (or one hard edit) from a member."""
        while True:  # a member one symbol outside the range, or an edit that keeps it a member, is drawn again
            member = self.member(rng, rng.choice(self.member_lengths(max(low - 1, 0), high + 1)))
            text = self.hard_negative(rng, member) if rng.random() < 0.5 else None
            if text is None:
                text = one_edit(rng, member, self.alphabet)
            if low <= len(text) <= high and not self.accepts(text):
                return text

    def example(self, rng, longer):
        low, high = self.span(longer)
        if rng.random() < 0.5:
            text = self.member(rng, rng.choice(self.member_lengths(low, high)))
        else:
            text = self.near_miss(rng, low, high)
        tokens = [ord(c) for c in text] + [QUERY, ACCEPT if self.accepts(text) else REJECT]
        return tokens, [len(tokens) - 2]


class Parity(Language):
    """Bit strings with an even number of ones. Every near miss is a bit flipped, or a 1 inserted
    or deleted; no local check decides parity, so no hard edit is needed."""

    name = "parity"
    alphabet = "01"
    empty_member = True

    def member(self, rng, size):
        bits = [rng.choice("01") for _ in range(size)]
        if bits.count("1") % 2:
            bits[-1] = "1" if bits[-1] == "0" else "0"
        return "".join(bits)

    def accepts(self, text):
        return text.count("1") % 2 == 0


class EvenA(Language):
    """(aa)*: strings of a's of even length. Over one symbol an edit is an insertion or a deletion,
    so every near miss is a string of a's of odd length."""

    name = "aa_star"
    alphabet = "a"
    step = 2
    empty_member = True

    def member(self, rng, size):
        return "a" * size

    def accepts(self, text):
        return set(text) <= {"a"} and len(text) % 2 == 0


class Abab(Language):
    """(abab)*. Every one-edit near miss breaks the alternation of a and b or its first or last
    symbol, which a local check sees; the hard negatives are the alternating strings one `ab` too
    long or too short, (ab)^(2k+1), which only counting the pairs rejects."""

    name = "abab_star"
    step = 4
    empty_member = True

    def member(self, rng, size):
        return "abab" * (size // 4)

    def hard_negative(self, rng, member):
        return member + "ab" if rng.random() < 0.5 else member[:-2]

    def accepts(self, text):
        return len(text) % 4 == 0 and text == "abab" * (len(text) // 4)


class AnBn(Language):
    """a^n b^n, n >= 1. The hard negatives are a^n b^m with |n - m| = 1 (one a or b inserted or
    deleted) and a^(n-1) b^(n+1) or a^(n+1) b^(n-1) (the boundary symbol substituted)."""

    name = "anbn"
    step = 2

    def member(self, rng, size):
        return "a" * (size // 2) + "b" * (size // 2)

    def hard_negative(self, rng, member):
        n = len(member) // 2
        a, b = rng.choice([(n + 1, n), (n - 1, n), (n, n + 1), (n, n - 1), (n - 1, n + 1), (n + 1, n - 1)])
        return "a" * a + "b" * b

    def accepts(self, text):
        n = len(text) // 2
        return len(text) % 2 == 0 and n > 0 and text == "a" * n + "b" * n


class AnBnCn(Language):
    """a^n b^n c^n, n >= 1. The hard negatives have one block one symbol longer or shorter, or a
    symbol at a block boundary substituted (a^(n-1) b^(n+1) c^n and the like)."""

    name = "anbncn"
    alphabet = "abc"
    step = 3

    def member(self, rng, size):
        return "a" * (size // 3) + "b" * (size // 3) + "c" * (size // 3)

    def hard_negative(self, rng, member):
        counts = [len(member) // 3] * 3
        if rng.random() < 0.5:  # one block longer or shorter
            counts[rng.randrange(3)] += rng.choice((1, -1))
        else:  # the symbol at one of the two boundaries becomes its neighbour's
            boundary = rng.randrange(2)
            moved = rng.choice((1, -1))
            counts[boundary] += moved
            counts[boundary + 1] -= moved
        return "a" * counts[0] + "b" * counts[1] + "c" * counts[2]

    def accepts(self, text):
        n = len(text) // 3
        return len(text) % 3 == 0 and n > 0 and text == "a" * n + "b" * n + "c" * n


def _dyck(rng: random.Random, pairs: int, opener: str, closer: str) -> list[str]:
    """A random balanced string of `pairs` bracket pairs."""
    out, depth, left = [], 0, pairs
    while left or depth:
        if left and (not depth or rng.random() < 0.5):
            out.append(opener)
            depth, left = depth + 1, left - 1
        else:
            out.append(closer)
            depth -= 1
    return out


class Shuffle2(Language):
    """Interleavings of two balanced bracket languages, () and []: each kind balanced on its own,
    nonempty. The hard negatives lose one bracket (one kind's count is off by one) or swap an
    adjacent opener and closer of one kind (a closer comes before its opener)."""

    name = "shuffle2"
    alphabet = "()[]"
    step = 2

    def member(self, rng, size):
        round_pairs = rng.randint(0, size // 2)
        round_, square = _dyck(rng, round_pairs, "(", ")"), _dyck(rng, size // 2 - round_pairs, "[", "]")
        where = set(rng.sample(range(size), len(round_)))
        round_, square = iter(round_), iter(square)
        return "".join(next(round_) if i in where else next(square) for i in range(size))

    def hard_negative(self, rng, member):
        pairs = [i for i in range(len(member) - 1) if member[i:i + 2] in ("()", "[]")]
        if rng.random() < 0.5 or not pairs:
            where = rng.randrange(len(member))
            return member[:where] + member[where + 1:]
        where = rng.choice(pairs)
        return member[:where] + member[where + 1] + member[where] + member[where + 2:]

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
    """Single needle in a haystack: a five-digit pass key hidden at a random place in filler text
    that fills the context, asked for at the end; the longer held-out examples fill `test_length`."""

    name = "niah"
    filler = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    needle = b" The pass key is %s. Remember it. "
    question = b" What is the pass key? The pass key is "
    digits = 5

    @classmethod
    def shortest_context(cls):
        return len(cls.needle % (b"0" * cls.digits)) + len(cls.question) + cls.digits  # no filler at all

    def example(self, rng, longer):
        key = "".join(rng.choice("0123456789") for _ in range(self.digits)).encode()
        needle = self.needle % key
        length = self.test_length if longer else self.length
        room = max(0, length - len(needle) - len(self.question) - len(key))
        haystack = (self.filler * (room // len(self.filler) + 1))[:room]
        where = rng.randrange(0, len(haystack) + 1)
        text = haystack[:where] + needle + haystack[where:] + self.question + key
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
    if length < cls.shortest_context():
        raise ValueError(f"task `{name}` needs train.context of at least {cls.shortest_context()} tokens "
                         f"(an example that scores a token), but it is {length}")
    if cls is AssociativeRecall:
        task = AssociativeRecall(length=length, **options)
        if task.keys < task.pairs:
            raise ValueError(f"mqar: {task.pairs} pairs need at least as many distinct keys, but keys={task.keys}")
        if task.keys + task.values > ACCEPT:
            raise ValueError(f"mqar: keys + values ({task.keys + task.values}) must stay below {ACCEPT}")
        return task
    return cls(length=length, test_length=2 * length)
