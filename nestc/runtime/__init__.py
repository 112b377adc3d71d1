"""Running compiled models: the training loop, checkpoints and memory states, corpora and tasks,
the outer optimizers, plots."""
