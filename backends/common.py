"""What every backend shares: errors and reading IR values."""

from __future__ import annotations

from nestc.lang import ir


class BackendError(Exception):
    """A checked spec that this backend cannot build (e.g. an unfrozen search space)."""


def concrete(value):
    """A fixed value; search-space values must have been frozen before lowering."""
    if isinstance(value, ir.SEARCH_TYPES):
        raise BackendError(f"the search-space value {ir.format_value(value)} reached the backend: "
                           "freeze the space to one variant first")
    return value


def op_args(op: ir.Op) -> dict:
    return {name: concrete(value) for name, value in op.args}
