"""Encrypted HTTP serving of linear layers (a fused export, named heads) and the private fit, and their clients.

`serve.server.create_app` / `run` (FastAPI + uvicorn; the fit routes in `serve.fit_service`),
`serve.client.Client` (fused or split mode; also `from serve import Client`), `serve.fit_client.PrivateFitClient`;
see serve/README.md. `serve.formats` is the bottom floor of the project (the on-disk formats, torch-free); the
server and every client module load no torch.
"""

CLIENT_NAMES = ("Client", "ServeError", "ServerReplyError", "ServerUnreachable", "ServerBusy", "BudgetExhausted",
                "Unauthorized", "SessionLost", "ModelMismatch", "ClientCacheError")


def __getattr__(name: str):
    """`from serve import Client` (and its errors), imported on first use: importing `serve.formats` or the
    server loads no client."""
    if name in CLIENT_NAMES:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'serve' has no attribute {name!r}")
