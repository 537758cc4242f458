"""Tests of solvers, subspace, logistic, standardisation (lightning_modules/fitting/)."""
