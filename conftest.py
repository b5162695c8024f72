"""Shared test helpers: start a real SensorFlow server on 127.0.0.1 and stop it by its pid."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

HERE = Path(__file__).resolve().parent
API_KEY = "test-key-0123456789"
WS_KEY = "test-ws-key-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One `python app.py` process with its own port and SQLite file."""

    def __init__(self, folder: Path, **env: str) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.db_path = folder / "sensorflow.db"
        self.log_path = folder / f"server-{self.port}.log"
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "SQLITE_PATH": str(self.db_path),
            "API_KEY": API_KEY,
            "API_KEY_WS": WS_KEY,
            "LOG_LEVEL": "WARNING",
        }
        self.env.update(env)
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "Server":
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "app.py")],
            cwd=self.folder,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if requests.get(self.url + "/api/v1/ping", timeout=1).ok:
                    return self
            except requests.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server by its pid; its writer process then ends on its own (or is killed)."""
        if self.process is None or self.process.poll() is not None:
            return
        writers = self.process_ids()[1:]
        os.kill(self.process.pid, sig)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        for pid in writers:
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def process_ids(self) -> list[int]:
        """The server's process id, then its writer process's (the child it forks)."""
        pid = self.process.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:  # it has just ended
            children = []
        return [pid, *map(int, children)]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def post(self, path: str, key: str = API_KEY, **kwargs) -> requests.Response:
        headers = {"X-API-Key": key, **kwargs.pop("headers", {})}
        return requests.post(self.url + path, headers=headers, timeout=10, **kwargs)

    def get(self, path: str, key: str = API_KEY, **kwargs) -> requests.Response:
        headers = {"X-API-Key": key, **kwargs.pop("headers", {})}
        return requests.get(self.url + path, headers=headers, timeout=30, **kwargs)


@pytest.fixture
def make_server(tmp_path):
    """Factory: make_server(**env) starts a server; every one is stopped after the test."""
    servers: list[Server] = []

    def make(folder: Path | None = None, **env: str) -> Server:
        server = Server(folder or tmp_path, **env).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server) -> Server:
    return make_server()
