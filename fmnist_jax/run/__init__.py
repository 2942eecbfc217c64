"""The run's files: the workdir and its lock, checkpoints, outputs; and the stop signals."""
