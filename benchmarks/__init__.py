"""Benchmarks: fmnist_jax against Keras and PyTorch on the same data, model and optimizer."""
