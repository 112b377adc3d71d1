"""Helpers for the reference-backend oracle tests (imported as `oracles`; tests/ is on sys.path).

- `fla_naive(name)` loads `fla/ops/<name>/naive.py` from the installed fla-core **by path**, so that
  `fla/__init__.py` (which imports triton, absent on CPU machines) is never imported. The naive files
  import only torch and einops (fla-core's one required dependency). When fla-core is not installed
  this raises, so the oracle tests FAIL rather than skip: install the `test` extra
  (`pip install -e ".[dev,test]"`, which is what `.ci/run` does).
- `kernel(body, ...)` builds a `MemoryKernel` from the body of a one-level spec.
- `assert_close(...)` compares at float32 tolerance and records the max abs difference; set
  NESTC_ORACLE_REPORT=FILE to have every comparison appended to FILE as a JSON line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

import nestc
from nestc.backends.attention import run_cache as compiled_run_cache
from nestc.backends.compiled import run_kernel as compiled_run_kernel
from nestc.backends.kernel import MemoryKernel
from nestc.backends.reference import run_cache, run_kernel

FLA_VERSION = "0.6.0"

# float32: 1e-5 relative to the largest reference value, never tighter than 1e-6 absolute.
RTOL = 1e-5
ATOL = 1e-6


# --- fla-core, loaded by path ----------------------------------------------------------------------


@cache
def fla_root() -> Path:
    """The installed `fla` package directory, located without importing it."""
    spec = importlib.util.find_spec("fla")  # a top-level find_spec does not run fla/__init__.py
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"fla-core=={FLA_VERSION} is not installed; the oracle tests need it: "
            f'pip install -e ".[test]"  (or: pip install fla-core=={FLA_VERSION})'
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    try:
        from importlib.metadata import version

        found = version("fla-core")
    except Exception:  # pragma: no cover - metadata missing is reported below
        found = "unknown"
    if found != FLA_VERSION:
        raise RuntimeError(f"the oracles are pinned to fla-core=={FLA_VERSION}, found {found} at {root}")
    return root


@cache
def fla_naive(name: str) -> ModuleType:
    """`fla/ops/<name>/naive.py` as a stand-alone module (never `import fla`)."""
    path = fla_root() / "ops" / name / "naive.py"
    if not path.is_file():
        raise RuntimeError(f"fla-core has no {path}")
    module_name = f"_fla_naive_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    assert "fla" not in sys.modules, "loading a naive.py imported the fla package (and so triton)"
    return module


# --- nestc -----------------------------------------------------------------------------------------


def level(body: str, state: str = "matrix"):
    """The checked IR level `m` of a one-level spec with this body."""
    text = f"level m : {state} {{\n" + "\n".join("    " + line.strip() for line in body.strip().splitlines()) + "\n}\n"
    return nestc.check(text).level("m")


def kernel(body: str, heads: int, key_dim: int, value_dim: int, state: str = "matrix") -> MemoryKernel:
    return MemoryKernel(level(body, state), heads=heads, key_dim=key_dim, value_dim=value_dim)


# Which backend's run_kernel the oracle tests exercise; the `kernel_backend` fixture (conftest)
# runs every such test once per backend.
RUN_KERNEL = {"reference": run_kernel, "compiled": compiled_run_kernel}
RUN_CACHE = {"reference": run_cache, "compiled": compiled_run_cache}  # the same, for attention levels
backend = "reference"


def run(kern: MemoryKernel, k, v, q, gates, state=None, start: int = 0):
    """run_kernel without an outer graph (the tests compare values only)."""
    with torch.no_grad():
        return RUN_KERNEL[backend](kern, k, v, q, gates, state=state, start=start)


# --- inputs ----------------------------------------------------------------------------------------


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def qkv(seed: int, B: int, T: int, H: int, dk: int, dv: int, normalize_keys: bool = True):
    """Random q, k [B, T, H, dk] and v [B, T, H, dv] in float32; keys L2-normalised (DeltaNet)."""
    g = generator(seed)
    q = torch.randn(B, T, H, dk, generator=g)
    k = torch.randn(B, T, H, dk, generator=g)
    v = torch.randn(B, T, H, dv, generator=g)
    if normalize_keys:
        k = F.normalize(k, dim=-1)
    return q, k, v


def uniform(seed: int, *shape, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=generator(seed))


# --- comparison ------------------------------------------------------------------------------------


def max_abs(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().double() - expected.detach().double()).abs().max().item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL) -> float:
    """|actual - expected| <= ATOL + rtol * max|expected| everywhere; returns the max abs difference."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(expected).all(), f"{what}: the reference itself is not finite"
    diff = max_abs(actual, expected)
    scale = expected.detach().abs().max().item()
    bound = ATOL + rtol * max(scale, 1.0)
    report = os.environ.get("NESTC_ORACLE_REPORT")
    if report:
        with open(report, "a") as out:
            out.write(json.dumps({"what": what, "max_abs": diff, "scale": scale, "bound": bound}) + "\n")
    assert diff <= bound, f"{what}: max abs difference {diff:.3e} > {bound:.3e} (max |reference| {scale:.3e})"
    return diff
