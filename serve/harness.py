"""The server in a thread of this process: uvicorn on a loopback port, for tests, benchmarks and demos."""
from __future__ import annotations

import socket
import threading
import time
from typing import Any

from .running import uvicorn_config


class ServerThread:
    """uvicorn in a daemon thread on a loopback port (0: any free one), for tests, benchmarks and demos.

    Stops when `stop()` is called, when its `with` block ends, or by itself after `max_lifetime_s`.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, max_lifetime_s: float = 600.0,
                 log_level: str = "warning"):
        import uvicorn

        # proto must be IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on such sockets, and without it
        # Nagle's algorithm and delayed ACKs add ~40 ms to every response.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn_config(app, log_level=log_level, log_config=None, lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name=f"uvicorn-{self.port}")
        self.watchdog = threading.Timer(max_lifetime_s, self.stop_soon)
        self.watchdog.daemon = True

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "ServerThread":
        self.thread.start()
        self.watchdog.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn did not start on {self.url} within {timeout_s:.0f}s")
            time.sleep(0.01)
        return self

    def stop_soon(self) -> None:
        self.server.should_exit = True

    def stop(self, timeout_s: float = 10.0) -> None:
        self.stop_soon()
        self.watchdog.cancel()
        if self.thread.is_alive():
            self.thread.join(timeout_s)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def wait_for_server(url: str, process: Any = None, timeout_s: float = 60.0, path: str = "/healthz",
                    **http: Any) -> None:
    """Return once GET `url + path` answers 200 (`http`: httpx options, e.g. verify=); RuntimeError naming why when
    `process` (a subprocess.Popen) exits first or `timeout_s` passes."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}{path}", timeout=2, **http).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with {process.returncode} before it answered {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no server answered {url}{path} within {timeout_s:.0f} s")
        time.sleep(0.2)
