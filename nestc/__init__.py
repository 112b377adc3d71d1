"""nestc: a compiler for nested-learning models.

Importing this package is cheap: nothing here imports torch. The backends import it when a model
is built.
"""

__version__ = "0.1.0"

from nestc.api import check, layer, load, load_run  # noqa: E402  (torch is imported only inside them)

__all__ = ["check", "layer", "load", "load_run", "__version__"]
