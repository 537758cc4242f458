"""Tests of the study and the ablation (lightning_modules/experiments/)."""
