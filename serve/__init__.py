"""Encrypted HTTP serving of an exported linear layer, and its client."""
