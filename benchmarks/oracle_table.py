"""The table of docs/language.md §10 "fla's naive oracles": zoo levels against fla-core's naive files.

    python benchmarks/oracle_table.py            # runs tests/test_zoo_oracles.py, then prints the table
    python benchmarks/oracle_table.py REPORT     # prints it from a report written earlier by
        NESTC_ORACLE_REPORT=REPORT python -m pytest -q tests/test_zoo_oracles.py

Every comparison of that test file is one JSON line of the report (tests/oracles.py `assert_close`:
`what` is "zoo SPEC | fla FAMILY.FUNCTION | BACKEND | CASE | LENGTH | outputs or final state", SPEC
possibly "SPEC + FIELD" (the spec's level with that field added),
`max_abs` its largest absolute difference). A row is one fla family matched by one zoo spec; its
figures are the largest difference over that family's functions, every gate case and length, reads
and final states, per backend (float32), and the largest ratio of a difference to the bound it was
held to (oracles.ATOL + RTOL * max(1, max |oracle|)).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_tests(report: Path) -> None:
    env = dict(os.environ, NESTC_ORACLE_REPORT=str(report), PYTHONPATH=str(REPO))
    env.setdefault("OMP_NUM_THREADS", "1")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_zoo_oracles.py"],
                   cwd=REPO, env=env, check=True)


def table(report: Path) -> str:
    functions: dict[tuple[str, str], set[str]] = defaultdict(set)
    worst: dict[tuple[str, str, str], float] = defaultdict(float)
    share: dict[tuple[str, str], float] = defaultdict(float)  # of the tolerance assert_close allowed
    for line in report.read_text().splitlines():
        entry = json.loads(line)
        parts = entry["what"].split(" | ")
        if len(parts) != 6 or not parts[0].startswith("zoo ") or not parts[1].startswith("fla "):
            continue  # a comparison that is not one zoo level against one oracle
        spec, oracle, backend = parts[0][len("zoo "):], parts[1][len("fla "):], parts[2]
        family, function = oracle.rsplit(".", 1)
        functions[family, spec].add(function)
        worst[family, spec, backend] = max(worst[family, spec, backend], entry["max_abs"])
        share[family, spec] = max(share[family, spec], entry["max_abs"] / entry["bound"])
    rows = ["| fla family | zoo spec | oracle function(s) | max abs difference, reference | compiled "
            "| largest share of the tolerance |",
            "|---|---|---|---|---|---|"]
    for family, spec in sorted(functions, key=lambda key: (key[1], key[0])):
        names = ", ".join(f"`{name}`" for name in sorted(functions[family, spec]))
        # "SPEC + FIELD": the spec's level with one field added (linear_attention + normalize)
        file, _, added = spec.partition(" + ")
        level = f"`{file}.nest`" + (f" with `{added}`" if added else "")
        rows.append(f"| `{family}` | {level} | {names} | {worst[family, spec, 'reference']:.1e} "
                    f"| {worst[family, spec, 'compiled']:.1e} | {share[family, spec]:.2f} |")
    return "\n".join(rows)


def main() -> None:
    if len(sys.argv) > 1:
        print(table(Path(sys.argv[1])))
        return
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.jsonl"
        run_tests(report)
        print(table(report))


if __name__ == "__main__":
    main()
