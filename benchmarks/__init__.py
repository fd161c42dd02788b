"""Benchmarks of grassmann_optax against Optax, run from the repository root."""
