"""Encrypted affine layer over CKKS (TenSEAL / SEAL). Math over arrays and keys only: imports no other xsilo package."""
