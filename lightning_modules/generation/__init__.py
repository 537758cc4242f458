"""Aligned generation: fit and save a map between two causal LMs, sample text through it, and evaluate it."""
