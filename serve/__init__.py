"""Encrypted HTTP serving of linear layers (a fused export, named heads) and the private fit, and their clients.

`serve.server.create_app` / `run` (FastAPI + uvicorn; the fit routes in `serve.fit_service`),
`serve.client.Client` (fused or split mode), `serve.fit_client.PrivateFitClient`; see serve/README.md.
`serve.formats` is the bottom floor of the project (the on-disk formats, torch-free); the server and every client
module load no torch.
"""
