"""Tests of evaluation, metrics and OOD (lightning_modules/evaluation/)."""
