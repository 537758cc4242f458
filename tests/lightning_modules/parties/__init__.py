"""Tests of the two parties' workflows (lightning_modules/parties/)."""
