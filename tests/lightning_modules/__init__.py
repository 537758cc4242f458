"""Tests of lightning_modules/: the command line, settings and configs here, one folder per room below."""
