"""Members and their registry, the ensemble model, data, config, single-process training, metrics."""
