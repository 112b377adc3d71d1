"""The rule registries: every state, objective, inner optimizer and output map of a memory level
is one entry here, and nothing else in nestc knows it by name.

An entry holds, side by side, everything the pipeline needs of one rule:
- its operator spec (name, parameters, defaults, docs), which nestc/lang/schema.py lists;
- its legality data (which states it is defined on, what it needs), which semantic analysis reads;
- its token-by-token reference step (backends/reference.py calls it);
- the pieces the compiled segment forms need (an objective's loss beside its closed-form error);
- its capability flags: the segment forms of backends/compiled.py that compute it exactly, from
  which the planner chooses (`forms`).

Rule modules import torch only inside their math: the front end reads their specs and legality
data and must stay torch-free. docs/architecture.md shows how to add an entry.
"""

from nestc.rules.base import FORMS, Rule
from nestc.rules.objectives import OBJECTIVE_GATES, OBJECTIVES, Objective, ObjectiveGate
from nestc.rules.optimizers import OPTIMIZER_GATES, OPTIMIZERS, Optimizer, OptimizerGate
from nestc.rules.outputs import OUTPUTS, OutputMap
from nestc.rules.states import STATES, State

REGISTRIES = {"state": STATES, "objective": OBJECTIVES, "optimizer": OPTIMIZERS, "output": OUTPUTS}

__all__ = ["FORMS", "OBJECTIVE_GATES", "OBJECTIVES", "OPTIMIZER_GATES", "OPTIMIZERS", "OUTPUTS", "REGISTRIES", "STATES",
           "Objective", "ObjectiveGate", "Optimizer", "OptimizerGate", "OutputMap", "Rule", "State"]
