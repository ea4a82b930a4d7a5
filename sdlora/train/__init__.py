"""Training: config, dataset, caches, the loop and its checkpoints."""
