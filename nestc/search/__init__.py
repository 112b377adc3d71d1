"""Search spaces over specs: enumerating variants, grid sweeps and Optuna studies."""
