"""Encrypted HTTP serving of an exported linear layer, and its client.

`serve.server.create_app` / `run` (FastAPI + uvicorn), `serve.client.Client`; see serve/README.md.
"""
