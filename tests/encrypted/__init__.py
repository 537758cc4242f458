"""Tests of CKKS layers and the encrypted Gram (encrypted/)."""
