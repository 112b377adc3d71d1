"""Built-in tasks: deterministic generators whose labels agree with independent checks."""

from __future__ import annotations

import random
import re

import pytest

from nestc.runtime import tasks
from nestc.runtime.tasks import ACCEPT, QUERY, REJECT


def _independent_accepts(name: str, text: str) -> bool:
    """Each language decided a second way: regular expressions, integer parity, bracket erasure."""
    if name == "parity":
        return bin(int(text, 2) if text else 0).count("1") % 2 == 0
    if name == "aa_star":
        return re.fullmatch(r"(aa)*", text) is not None
    if name == "abab_star":
        return re.fullmatch(r"(abab)+", text) is not None
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


@pytest.mark.parametrize("name", ["parity", "aa_star", "abab_star", "anbn", "anbncn", "shuffle2"])
def test_language_labels_match_an_independent_decision_and_are_balanced(name):
    task = tasks.make(name, 24)
    batch = task.batch(random.Random(0), 200)
    accepted = 0
    for row, mask in zip(batch.tokens.tolist(), batch.scored.tolist()):
        (question,) = [i for i, scored in enumerate(mask) if scored]
        assert row[question] == QUERY
        text = "".join(chr(t) for t in row[:question])
        label = row[question + 1]
        assert label == (ACCEPT if _independent_accepts(name, text) else REJECT), text
        accepted += label == ACCEPT
    assert 60 <= accepted <= 140  # neither class dominates


def test_held_out_sequences_are_longer():
    task = tasks.make("parity", 16)
    assert task.batch(random.Random(0), 2, held_out=True).tokens.shape[1] == 32


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_generation_is_deterministic_under_a_seed(name):
    task = tasks.make(name, 64)
    first, again = task.batch(random.Random(5), 8), task.batch(random.Random(5), 8)
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


def test_the_pass_key_answer_is_the_hidden_key():
    task = tasks.make("niah", 200)
    batch = task.batch(random.Random(2), 5)
    for row, mask in zip(batch.tokens.tolist(), batch.scored.tolist()):
        text = bytes(t for t in row if t < 250).decode()
        hidden = re.search(r"The pass key is (\d{5})\. Remember", text).group(1)
        answer = "".join(chr(row[i + 1]) for i, s in enumerate(mask) if s)
        assert answer == hidden


def test_the_command_line_offers_every_task():
    from nestc.cli import run

    option = next(p for p in run.params if p.name == "task")
    assert set(option.type.choices) == set(tasks.TASKS)
