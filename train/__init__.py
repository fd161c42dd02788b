"""Flax training program for the Grassmann optimizers (SPEC section 7)."""
