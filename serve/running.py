"""Running the server under uvicorn (`xsilo serve`): connection limits, forwarded headers, TLS, JSON logs, drain.

* Forwarded headers: uvicorn believes X-Forwarded-For from 127.0.0.1 by default, which would let any local
  client choose its own budget identity; here they are read only from `trusted_proxies` (none by default: the
  peer address is the client).
* Drain: the first SIGTERM (or SIGINT) marks the service draining (`/readyz` answers 503), keeps serving for
  `drain_delay_s` so that the balancer stops sending traffic, then stops accepting and gives in-flight requests
  `drain_timeout_s` to finish; the process then exits 0. A second signal exits at once (status 128 + signal).
"""
from __future__ import annotations

import logging
import logging.config
import signal
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import uvicorn
from fastapi import FastAPI

from .observability import json_log_config
from .server import create_app
from .settings import ServerSettings
from .transport import limited_protocol

log = logging.getLogger("serve")


def uvicorn_config(app: FastAPI, **options: Any) -> uvicorn.Config:
    """A uvicorn.Config for `app` with its ServerSettings' connection limits (header deadline, connection caps,
    header size, keep-alive) on the h11 protocol, forwarded headers only from trusted proxies, and TLS when
    configured; `options` are other uvicorn.Config arguments."""
    settings: ServerSettings = app.state.service.settings
    protocol = limited_protocol(settings.header_timeout_s, settings.max_connections, settings.max_header_bytes,
                                settings.max_connections_per_client, settings.trusted_proxies)
    proxies: dict[str, Any] = {"proxy_headers": bool(settings.trusted_proxies)}
    if settings.trusted_proxies:
        proxies["forwarded_allow_ips"] = list(settings.trusted_proxies)
    tls = {"ssl_certfile": settings.ssl_certfile, "ssl_keyfile": settings.ssl_keyfile} if settings.ssl_certfile else {}
    # ws="none": no WebSocket upgrades (no route takes one, and an upgrade would leave the h11 protocol's counts)
    return uvicorn.Config(app, http=protocol, ws="none", h11_max_incomplete_event_size=settings.max_header_bytes,
                          timeout_keep_alive=settings.keep_alive_s, server_header=False, access_log=False,
                          **proxies, **tls, **options)


def exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM as SystemExit, so that `finally` blocks and atexit handlers (the HE scratch folder) run.

    Installed for the whole process: it answers a SIGTERM that arrives before uvicorn installs its own handlers
    (while the folders load) or after it restores them; the default handler would kill the process at once,
    skipping atexit."""
    raise SystemExit(128 + signum)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains (calls `on_drain`, keeps serving `drain_delay_s`, then shuts
    down gracefully within the config's timeout_graceful_shutdown) and whose second one exits at once."""

    def __init__(self, config: uvicorn.Config, drain_delay_s: float = 0.0,
                 on_drain: Callable[[], None] = lambda: None):
        super().__init__(config)
        self.drain_delay_s, self.on_drain = drain_delay_s, on_drain
        self.drain_deadline: float | None = None
        self.drain_logged = False
        self.forced_by: int | None = None  # the signal that forced the exit, if one did

    def handle_exit(self, sig: int, frame: Any) -> None:  # a signal handler: flags only, no logging (its lock)
        if self.drain_deadline is None:
            self.on_drain()
            self.drain_deadline = time.monotonic() + self.drain_delay_s
            self.should_exit = self.drain_delay_s <= 0
        else:
            self.forced_by, self.should_exit, self.force_exit = sig, True, True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None:
            if not self.drain_logged:
                self.drain_logged = True
                log.info("draining: /readyz answers 503; serving %.1f s more, then in-flight requests have %s s",
                         self.drain_delay_s, self.config.timeout_graceful_shutdown)
            if time.monotonic() >= self.drain_deadline:
                self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: Any = None) -> None:
        import asyncio

        async def abort_when_forced() -> None:
            while not self.force_exit:
                await asyncio.sleep(0.05)
            for connection in list(self.server_state.connections):
                connection.transport.abort()  # type: ignore[union-attr]

        watcher = asyncio.create_task(abort_when_forced())
        try:
            await super().shutdown(sockets)
        finally:
            watcher.cancel()


def log_served(app: FastAPI, export_dir: str | Path | None) -> None:
    """One log line per served thing: the fused export, each head, the public set."""
    info = app.state.service.info
    if info["export_sha256"] is not None:
        log.info("serving export %s: %d -> %d (%s), sha256 %s, CKKS N=%d, %d lanes per ciphertext", export_dir,
                 info["input_dim"], info["output_dim"], ", ".join(info["label_names"]), info["export_sha256"][:16],
                 info["layout"]["profile"]["poly_modulus_degree"], info["lanes"])
    for head_name, head in info["heads"].items():
        log.info("serving head %s: %d -> %d (%s), sha256 %s, %d lanes per ciphertext%s", head_name,
                 head["input_dim"], head["output_dim"], ", ".join(head["label_names"]), head["sha256"][:16],
                 head["lanes"], ", feature-space OOD detector published" if head["feature_ood"] else "")
    if info["public_set"] is not None:
        public_set = info["public_set"]
        anchors = public_set.get("anchors")
        log.info("serving public set %s for private fits: %d rows (%s)%s, %d-d states, fingerprint %s",
                 public_set["name"], public_set["rows"], public_set["parts"],
                 f" and {anchors['rows']} anchors" if anchors else "", public_set["hidden_size"],
                 public_set["fingerprint"][:16])


def run(export_dir: str | Path | None = None, *, heads: Sequence[str | Path] = (), public: str | Path | None = None,
        host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **app_options: Any) -> None:
    """Serve with uvicorn until sent SIGTERM/SIGINT (folders and options as in `create_app`), logging JSON lines
    to stderr. Returns after a drain; raises SystemExit(128 + signal) when a second signal cut it short."""
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    log_config = json_log_config(log_level)
    logging.config.dictConfig(log_config)
    logging.captureWarnings(True)
    app = create_app(export_dir, heads=heads, public=public, **app_options)
    settings: ServerSettings = app.state.service.settings
    log_served(app, export_dir)
    log.info("docs at %s://%s:%d/docs", "https" if settings.ssl_certfile else "http", host, port)
    config = uvicorn_config(app, host=host, port=port, log_level=log_level, log_config=log_config,
                            timeout_graceful_shutdown=settings.drain_timeout_s)
    service = app.state.service
    server = DrainingServer(config, settings.drain_delay_s, lambda: setattr(service, "draining", True))
    server.run()
    if server.forced_by is not None:
        raise SystemExit(128 + server.forced_by)
