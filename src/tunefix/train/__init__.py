"""Training: the typed run config and the trainer glue."""
