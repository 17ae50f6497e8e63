"""Training primitives the tasks and the runner build on: the state and its optimizer, the
task-independent gradient step, regularization, checkpoints, early stopping, signals."""
