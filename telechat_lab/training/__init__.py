"""Training: the Lightning module and data module, adapters, strategies, callbacks and the run."""
