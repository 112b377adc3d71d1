"""Mutated zoo specs for fuzzing the front end (tests/test_fuzz.py, benchmarks/fuzz.py).

Each mutant is one or more edits of a zoo spec, drawn from families that each once found an
internal error: token edits, deep nesting, huge numbers, NUL bytes, imports of special files and
import cycles. A mutant is written into a directory that holds the zoo's library and the special
files, so its imports resolve (or fail) as they would for a user.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

from nesttest import SPECS, ZOO

ALPHABET = '{}()[]=:,|>"#;' + "abcxyzAZ_0123456789 \n"
# Import targets a plain read would block on, never finish, or choke on.
SPECIAL_IMPORTS = ("fifo.nest", "zero.nest", "huge.nest", "missing.nest", "mutant.nest", "cycle_a.nest")


def prepare(directory: Path) -> None:
    """The library the zoo imports, and the special files the import mutations name."""
    shutil.copytree(SPECS / "lib", directory / "lib", dirs_exist_ok=True)
    os.mkfifo(directory / "fifo.nest")
    (directory / "zero.nest").symlink_to("/dev/zero")
    (directory / "huge.nest").write_bytes(b"#" * ((1 << 20) + 1))
    (directory / "cycle_a.nest").write_text('import "cycle_b.nest"\n', encoding="utf-8")
    (directory / "cycle_b.nest").write_text('import "cycle_a.nest"\n', encoding="utf-8")


def _token_edit(text: str, rng: random.Random) -> str:
    """Delete, duplicate or swap lines; delete or insert a character; truncate."""
    lines = text.split("\n")
    operation = rng.choice(["delete_line", "duplicate_line", "swap_lines", "delete_char", "insert_char",
                            "insert_char", "truncate"])
    if operation == "delete_line" and len(lines) > 1:
        del lines[rng.randrange(len(lines))]
    elif operation == "duplicate_line":
        index = rng.randrange(len(lines))
        lines.insert(index, lines[index])
    elif operation == "swap_lines" and len(lines) > 1:
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif operation == "delete_char" and text:
        index = rng.randrange(len(text))
        return text[:index] + text[index + 1:]
    elif operation == "insert_char":
        index = rng.randrange(len(text) + 1)
        return text[:index] + rng.choice(ALPHABET) + text[index:]
    elif operation == "truncate":
        return text[:rng.randrange(len(text) + 1)]
    return "\n".join(lines)


def _deep_nesting(text: str, rng: random.Random) -> str:
    """Wrap the model's block in hundreds of calls, or chain hundreds of stages or terms."""
    depth = rng.randint(50, 700)
    if "block = " not in text:
        return text
    head, tail = text.split("block = ", 1)
    body, rest = (tail.split("\n", 1) + [""])[:2]
    form = rng.choice(["calls", "stages", "terms"])
    if form == "calls":
        body = "residual(" * depth + body + ")" * depth
    elif form == "stages":
        body = body + " |> rmsnorm" * depth
    else:
        return f"const deep = {' + '.join(['1'] * depth)}\n" + text
    return head + "block = " + body + "\n" + rest


def _huge_number(text: str, rng: random.Random) -> str:
    digits = [i for i, c in enumerate(text) if c.isdigit()]
    if not digits:
        return text
    index = rng.choice(digits)
    return text[:index] + rng.choice(["9" * rng.randint(20, 400), "1e400", "1e-400", "2" * 30 + ".5"]) + text[index:]


def _nul_byte(text: str, rng: random.Random) -> str:
    quote = text.find('"')
    index = quote + 1 if quote >= 0 and rng.random() < 0.5 else rng.randrange(len(text) + 1)
    return text[:index] + "\0" + text[index:]


def _special_import(text: str, rng: random.Random) -> str:
    return f'import "{rng.choice(SPECIAL_IMPORTS)}"\n' + text


FAMILIES = (_token_edit, _token_edit, _token_edit, _deep_nesting, _huge_number, _nul_byte, _special_import)


def mutants(count: int, seed: int) -> list[tuple[str, str]]:
    """`count` (zoo spec name, mutated text) pairs, deterministic for a seed and a zoo."""
    rng = random.Random(seed)
    texts = [(path.relative_to(SPECS.parent).as_posix(), path.read_text(encoding="utf-8")) for path in ZOO]
    out = []
    for _ in range(count):
        name, text = rng.choice(texts)
        for _ in range(rng.randint(1, 3)):
            text = rng.choice(FAMILIES)(text, rng)
        out.append((name, text))
    return out
