"""Tests of AffineAligner and LinearClassifier (lightning_modules/models/)."""
