"""Compiling for chips this machine lacks: targets, XLA:TPU and XLA:GPU checks, jax.export."""
