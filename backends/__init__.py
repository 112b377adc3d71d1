"""Backends that lower a checked spec to PyTorch; installed as `nestc.backends`."""
