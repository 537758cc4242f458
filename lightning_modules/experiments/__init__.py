"""Experiment drivers over the pipeline: `study` (every ordered pair of N models) and `ablation` (each factor
of the alignment recipe varied alone). They take the settings of `lightning_modules.settings`."""
