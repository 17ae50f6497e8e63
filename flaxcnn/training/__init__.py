"""Training: the loop, compiled steps, state and optimizers, checkpoints, early stopping,
signals."""
