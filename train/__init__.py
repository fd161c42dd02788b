"""Flax training program for SGD-G and Adam-G (Cho & Lee, NeurIPS 2017, arXiv:1709.09603)."""
