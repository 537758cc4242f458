"""Tests of mapped generation (lightning_modules/generation/)."""
