"""What every rule entry has: its operator spec and the segment forms that compute it."""

from __future__ import annotations

from nestc.lang.operators import OpSpec

# The compiled backend's segment forms (docs/backends.md). A memory runs in a form only if its
# state, objective, optimizer and output map all list it; otherwise it steps token by token.
# `scan` runs only an `update` written with optimizer levels that no built-in equals (nestc/passes/plan.py).
# `gram` runs only optimizer `solve` (MesaNet's exact solve: every token's Gram matrix, then one solve).
FORMS = ("anchored", "delta", "layered", "trajectory", "scan", "gram")


class Rule:
    """One entry of a registry. Subclasses set `spec`, and `forms` where compiled forms exist."""

    spec: OpSpec
    forms: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"<{self.spec.kind} {self.name}>"


def registry(*entries: Rule) -> dict[str, Rule]:
    """Entries by name, checked once at import: each lists only forms that exist."""
    for entry in entries:
        unknown = entry.forms - set(FORMS)
        if unknown:
            raise TypeError(f"{entry!r} lists unknown segment forms {sorted(unknown)}")
    return {entry.name: entry for entry in entries}
