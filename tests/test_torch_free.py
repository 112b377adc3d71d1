"""`nestc check`, `graph`, `fmt` and `explain` never import torch (README: "never import torch").

Each check runs in a fresh interpreter, since this test process may have torch loaded already.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from nesttest import REPO

PROGRAM = """
import sys
from nestc import cli
sys.argv = ["nestc", *sys.argv[1:]]
try:
    cli.main()
except SystemExit as done:
    code = done.code
else:
    code = 0
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("TORCH-MODULES:", loaded, file=sys.stderr)
sys.exit(99 if loaded else code)
"""


@pytest.mark.parametrize("args, code", [
    (["check", "specs/hope.nest", "specs/spaces/hope_space.nest"], 0),
    (["graph", "--format", "json", "specs/hope.nest"], 0),
    (["check", "tests/golden/errors/values.nest"], 1),
    (["fmt", "--stdout", "specs/titans.nest"], 0),
    (["explain", "N0109"], 0),
])
def test_cli_does_not_import_torch(args, code):
    completed = subprocess.run([sys.executable, "-c", PROGRAM, *args], cwd=REPO, capture_output=True,
                               text=True, timeout=600)
    assert "TORCH-MODULES: []" in completed.stderr, completed.stderr
    assert completed.returncode == code, completed.stderr


def test_importtime_shows_no_torch():
    completed = subprocess.run([sys.executable, "-X", "importtime", "-m", "nestc", "check", "specs/hope.nest"],
                               cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in completed.stderr.splitlines()
                if line.startswith("import time:")]
    assert "nestc.lang.sema" in imported  # the import log is really there
    assert not [name for name in imported if name == "torch" or name.startswith("torch.")]


def test_importing_the_front_end_does_not_import_torch():
    # nor transformers, which only nestc.hf (the optional Hugging Face interop) imports
    program = ("import sys, nestc, nestc.cli, nestc.lang.sema, nestc.graph, nestc.lang.formatter, nestc.lang.ir, "
               "nestc.lang.errors, nestc.rules, nestc.passes.plan; "
               "print(any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.stdout.strip() == "False", completed.stderr
