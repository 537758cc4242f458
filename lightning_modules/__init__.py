"""Affine aligner, classifier head, evaluation and export (LightningModules and the math under them)."""
