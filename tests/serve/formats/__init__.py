"""Tests of the torch-free formats (serve/formats/): readers, writers, older folders."""
