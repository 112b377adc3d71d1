"""The types of the language's vocabulary: an operator (`OpSpec`) and its parameters (`Param`).

They live apart from schema.py so that the rule registries (nestc/rules/), whose entries hold
their own operator specs, can build them without importing the tables they feed.
"""

from __future__ import annotations

from dataclasses import dataclass

REQUIRED = object()  # marks a parameter without default


@dataclass(frozen=True, slots=True)
class Param:
    """One argument of an operator or one field of a section.

    `type` is one of: int, number, bool, string, enum (value in `choices`), level (the name of a
    level), list (of numbers), or a *kind* of operator ("objective", "stage", ...), or one of the
    structured kinds: "source" (a key/value/query pipeline), "gate", "block", "frequency", "layers"
    (an int, or a list with each layer's block).
    """

    name: str
    type: str
    default: object = REQUIRED
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    exclusive_minimum: bool = False
    fixed: bool = False  # True where a search-space value is not allowed
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True, slots=True)
class OpSpec:
    name: str
    kind: str
    params: tuple[Param, ...] = ()
    variadic: str | None = None  # type of extra positional arguments (parallel(...), choice(...))
    doc: str = ""

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def op_spec(kind: str, name: str, *params: Param, variadic: str | None = None, doc: str = "") -> OpSpec:
    return OpSpec(name=name, kind=kind, params=tuple(params), variadic=variadic, doc=doc)
