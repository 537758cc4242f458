"""The two LightningModules: `AffineAligner` (wraps a fitted `AffineMap`) and `LinearClassifier` (the task head)."""
