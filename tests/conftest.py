"""Shared pytest configuration for the nestc front-end suite.

`pytest --update-goldens` rewrites the expected outputs under tests/golden/ from the current
compiler instead of comparing against them (review the diff before committing it).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

# Hypothesis: no example database (keeps the working tree clean), no deadline (CI machines are slow).
settings.register_profile(
    "nestc", database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("nestc")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-goldens",
        action="store_true",
        default=False,
        help="rewrite tests/golden/**/*.ir.txt, *.graph.txt and *.stderr from the current nestc",
    )


@pytest.fixture
def update_goldens(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-goldens"))


@pytest.fixture
def at_repo_root(monkeypatch: pytest.MonkeyPatch):
    """Run the test with the repository root as the working directory (stable relative paths)."""
    from nesttest import REPO

    monkeypatch.chdir(REPO)
    return REPO


@pytest.fixture(params=["reference", "compiled"])
def kernel_backend(request, monkeypatch):
    """Run a memory-rule test against each backend's kernels."""
    import oracles

    monkeypatch.setattr(oracles, "backend", request.param)
    return request.param
