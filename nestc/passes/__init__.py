"""Passes over the checked IR, between the front end and the backends: planning (plan.py) decides
how the compiled backend schedules each level. Passes read the IR and the rule registries only,
never torch."""
