"""Hydra plugins of telechat-lab (Hydra loads plugins from the hydra_plugins namespace only)."""
