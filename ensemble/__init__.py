"""Members and their registry, the ensemble model, data, config, the training loop, metrics."""
