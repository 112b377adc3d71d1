"""Built-in tasks: deterministic generators whose labels agree with independent checks, negatives
that are near misses, and held-out scores over enough tokens, the training lengths and the longer
ones apart."""

from __future__ import annotations

import random
import re

import pytest
import torch

from nestc.runtime import tasks
from nestc.runtime.tasks import ACCEPT, QUERY, REJECT
from nestc.runtime.train import task_scores

LANGUAGES = ["parity", "aa_star", "abab_star", "anbn", "anbncn", "shuffle2"]
ALPHABETS = {"parity": "01", "aa_star": "a", "abab_star": "ab", "anbn": "ab", "anbncn": "abc", "shuffle2": "()[]"}


def _independent_accepts(name: str, text: str) -> bool:
    """Each language decided a second way: regular expressions, integer parity, bracket erasure."""
    if name == "parity":
        return bin(int(text, 2) if text else 0).count("1") % 2 == 0
    if name == "aa_star":
        return re.fullmatch(r"(aa)*", text) is not None
    if name == "abab_star":
        return re.fullmatch(r"(abab)*", text) is not None
    if name == "anbn":
        match = re.fullmatch(r"(a+)(b+)", text)
        return bool(match) and len(match.group(1)) == len(match.group(2))
    if name == "anbncn":
        match = re.fullmatch(r"(a+)(b+)(c+)", text)
        return bool(match) and len({len(g) for g in match.groups()}) == 1
    if name == "shuffle2":
        if not text:
            return False
        for pair in ("()", "[]"):
            only = "".join(c for c in text if c in pair)
            while pair in only:
                only = only.replace(pair, "")
            if only:
                return False
        return True
    raise AssertionError(name)


def _one_edit_neighbours(text: str, alphabet: str):
    """Every string one substitution, insertion, deletion or adjacent swap away from `text`."""
    for i in range(len(text) + 1):
        for c in alphabet:
            yield text[:i] + c + text[i:]
    for i in range(len(text)):
        yield text[:i] + text[i + 1:]
        for c in alphabet:
            yield text[:i] + c + text[i + 1:]
    for i in range(len(text) - 1):
        yield text[:i] + text[i + 1] + text[i] + text[i + 2:]


def _examples(task, count: int, longer: bool, seed: int = 0) -> list[tuple[str, int]]:
    """(string, answer token) of `count` generated examples."""
    batch = task.batch(random.Random(seed), count, longer=longer)
    out = []
    for row, mask in zip(batch.tokens.tolist(), batch.scored.tolist()):
        (question,) = [i for i, scored in enumerate(mask) if scored]
        assert row[question] == QUERY
        out.append(("".join(chr(t) for t in row[:question]), row[question + 1]))
    return out


@pytest.mark.parametrize("longer", [False, True])
@pytest.mark.parametrize("name", LANGUAGES)
def test_language_labels_match_an_independent_decision_and_are_balanced(name, longer):
    task = tasks.make(name, 24)
    examples = _examples(task, 200, longer)
    for text, label in examples:
        assert label == (ACCEPT if _independent_accepts(name, text) else REJECT), text
    accepted = sum(label == ACCEPT for _, label in examples)
    assert 70 <= accepted <= 130  # members and near misses in balance (binomial: 100 +- 7)


@pytest.mark.parametrize("name", LANGUAGES)
def test_training_and_longer_strings_have_disjoint_lengths(name):
    task = tasks.make(name, 24)
    training = {len(text) for text, _ in _examples(task, 300, longer=False)}
    longer = {len(text) for text, _ in _examples(task, 300, longer=True)}
    assert min(training) >= 1 and max(training) <= 22  # a string, QUERY and the answer fit in 24
    assert min(longer) >= 23 and max(longer) <= 46  # longer than any training string, fit in 48


@pytest.mark.parametrize("longer", [False, True])
@pytest.mark.parametrize("name", LANGUAGES)
def test_every_negative_is_one_edit_from_a_member(name, longer):
    """Brute force on short strings: some string in each negative's one-edit neighbourhood belongs.
    (abab)*'s hard negatives, (ab)^(2k+1), are one `ab` from a member instead."""
    task = tasks.make(name, 10)
    negatives = [text for text, label in _examples(task, 300, longer, seed=3) if label == REJECT]
    assert len(negatives) > 100
    for text in negatives:
        hard = name == "abab_star" and re.fullmatch(r"ab(abab)*", text)
        assert hard or any(_independent_accepts(name, near) for near in _one_edit_neighbours(text, ALPHABETS[name])), \
            text


@pytest.mark.parametrize("name, pattern", [("abab_star", r"(ab)+"), ("anbn", r"a+b+"), ("anbncn", r"a+b+c+")])
def test_many_negatives_have_the_members_shape_and_only_counting_rejects_them(name, pattern):
    """A uniform random string almost never has this shape; the hard negatives always do."""
    task = tasks.make(name, 32)
    negatives = [text for text, label in _examples(task, 400, longer=True) if label == REJECT]
    shaped = sum(re.fullmatch(pattern, text) is not None for text in negatives)
    assert shaped >= 0.4 * len(negatives)


def test_too_short_a_context_is_refused_with_the_shortest_that_works():
    with pytest.raises(ValueError, match=r"task `anbncn` needs train.context of at least 5 tokens"):
        tasks.make("anbncn", 4)
    assert tasks.make("anbncn", 5).batch(random.Random(0), 4, longer=True).scored.sum() == 4


class _Oracle(torch.nn.Module):
    """A fake model that reads the answer off the row itself (each position's logits put all their
    weight on the next token), but only on examples no longer than `up_to` tokens before the
    question (or, without a question, rows no longer than `up_to`); beyond, its guess at every
    position is ACCEPT or REJECT by a coin flip (`beyond="random"`), or a token that is never the
    answer (`beyond="wrong"`). It counts the rows it is shown, by the length of their batch."""

    def __init__(self, up_to: int, beyond: str):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # task_scores reads the device off a parameter
        self.up_to, self.beyond = up_to, beyond
        self.coin = torch.Generator().manual_seed(0)
        self.rows = {}

    def forward(self, tokens):
        batch, length = tokens.shape
        self.rows[length] = self.rows.get(length, 0) + batch
        logits = torch.zeros(batch, length, 256)
        following = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
        for row in range(batch):
            question = (tokens[row] == QUERY).nonzero()
            size = int(question[0]) if len(question) else length
            if size <= self.up_to:
                logits[row, torch.arange(length), following[row]] = 1.0
            elif self.beyond == "random":
                flips = torch.rand(length, generator=self.coin) < 0.5
                logits[row, torch.arange(length), torch.where(flips, ACCEPT, REJECT)] = 1.0
            else:
                logits[row, :, 0] = 1.0  # token 0 is never a target
        return logits, None


@pytest.mark.parametrize("name", LANGUAGES)
def test_the_two_accuracies_are_over_disjoint_length_ranges(name):
    task = tasks.make(name, 16)
    random_beyond = task_scores(_Oracle(up_to=14, beyond="random"), task, seed=0)
    assert random_beyond.in_distribution == 1.0
    assert 0.4 <= random_beyond.longer <= 0.6  # chance, over >= 1,000 tokens (sd 0.016)
    wrong_beyond = task_scores(_Oracle(up_to=14, beyond="wrong"), task, seed=0)
    assert wrong_beyond.in_distribution == 1.0 and wrong_beyond.longer == 0.0
    # a model right only on strings shorter than the longest training one is wrong on some
    shorter = task_scores(_Oracle(up_to=13, beyond="wrong"), task, seed=0)
    assert shorter.in_distribution < 1.0


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_held_out_scores_are_over_at_least_a_thousand_tokens_per_range(name):
    length = 100 if name == "niah" else 32
    task = tasks.make(name, length)
    model = _Oracle(up_to=0, beyond="wrong")
    scores = task_scores(model, task, seed=1)
    shown = {longer: sum(rows for size, rows in model.rows.items() if (size > length) == longer)
             for longer in (False, True)}
    assert scores.in_distribution_tokens >= 1000
    if name == "mqar":  # held out as trained: nothing longer to score
        assert scores.longer is None and scores.longer_tokens == 0 and max(model.rows) <= length
    else:
        assert scores.longer_tokens >= 1000 and max(model.rows) <= 2 * length
    if name == "niah":  # every example fills its context
        assert set(model.rows) == {length, 2 * length}
    if name in LANGUAGES:  # one answer per string: the model was shown as many rows as tokens were scored
        assert shown == {False: scores.in_distribution_tokens, True: scores.longer_tokens}


def test_generation_is_deterministic_under_a_seed_and_stays_below_256():
    for name in sorted(tasks.TASKS):
        task = tasks.make(name, 100)
        for longer in (False, True):
            first, again = task.batch(random.Random(5), 8, longer), task.batch(random.Random(5), 8, longer)
            assert first.tokens.equal(again.tokens) and first.scored.equal(again.scored)
            assert int(first.tokens.max()) < 256


def test_recall_answers_are_the_values_paired_with_the_keys():
    task = tasks.make("mqar", 64)
    batch = task.batch(random.Random(1), 20)
    for row, mask in zip(batch.tokens.tolist(), batch.scored.tolist()):
        query = row.index(QUERY)
        pairs = dict(zip(row[0:query:2], row[1:query:2]))
        scored = [i for i, s in enumerate(mask) if s]
        assert scored and all(i > query for i in scored)
        assert all(row[i + 1] == pairs[row[i]] for i in scored)


@pytest.mark.parametrize("longer", [False, True])
def test_the_pass_key_answer_is_the_hidden_key(longer):
    task = tasks.make("niah", 200)
    batch = task.batch(random.Random(2), 5, longer)
    for row, mask in zip(batch.tokens.tolist(), batch.scored.tolist()):
        text = bytes(t for t in row if t < 250).decode()
        assert len(text) == (400 if longer else 200)  # the haystack fills the context
        hidden = re.search(r"The pass key is (\d{5})\. Remember", text).group(1)
        answer = "".join(chr(row[i + 1]) for i, s in enumerate(mask) if s)
        assert answer == hidden


def test_the_command_line_offers_every_task():
    from nestc.cli import run

    option = next(p for p in run.params if p.name == "task")
    assert set(option.type.choices) == set(tasks.TASKS)
