"""Tests of texts, extraction, caches and DataModules (datamodules/)."""
