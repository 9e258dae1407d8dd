"""`heavylift serve` as a user starts it: a subprocess on a free loopback port over a tiny checkpoint,
driven with OpenAI's own client.

tests/serve is a package so that this conftest loads as `serve.conftest`: a second top-level module named
`conftest` would replace tests/conftest.py in sys.modules, which other tests import by that name.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import save_runnable_checkpoint

SRC = Path(__file__).resolve().parents[2] / "src"
START_S = 90  # at most this long from launch to /health 200 (torch and transformers import, then the load)
STOP_S = 30  # at most this long from Ctrl-C to exit
POLL_S = 0.02
CONTEXT = 256
MAX_SEQS = 4
API_KEY = "sk-test-key"
# The small server of the 401 and 429 tests: one slot, one waiting request, a context long enough for a
# generation that holds the slot for seconds (the tiny model decodes about 500 tokens/s on this CPU).
SMALL_CONTEXT = 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC), "PYTHONUNBUFFERED": "1"}


class Server:
    """A `heavylift serve` process: its address, its stderr (in a file, read at any time), and the /health
    answers seen while it started."""

    def __init__(self, args: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "w") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "heavylift", "serve", *args, "--port",
                                             str(self.port)], env=server_env(), stdout=subprocess.DEVNULL,
                                            stderr=err,  # Ctrl-C at its default, as a terminal starts it
                                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.health_seen: list[tuple[int, dict]] = []
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                status, body = self.get("/health")
            except OSError:  # not listening yet
                time.sleep(POLL_S)
                continue
            self.health_seen.append((status, body))
            if status == 200:
                return
            time.sleep(POLL_S)
        self.stop()
        pytest.fail(f"heavylift serve did not start: {self.stderr()}")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, parsed JSON or text, headers) of one request on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            raw = response.read().decode()
            kind = response.getheader("content-type", "")
            return response.status, (json.loads(raw) if "json" in kind else raw), dict(response.getheaders())
        finally:
            conn.close()

    def get(self, path: str):
        status, body, _ = self.request("GET", path)
        return status, body

    def post(self, path: str, body: dict | bytes, headers: dict | None = None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, parsed, _ = self.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
        return status, parsed

    def metrics(self) -> dict[str, float]:
        """/metrics samples without labels, by name."""
        _, text = self.get("/metrics")
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.split(" ")
                samples[name] = float(value)
        return samples

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")

    def stderr(self) -> str:
        return self.log.read_text()

    def interrupt(self) -> int:
        """Ctrl-C; the exit code."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=STOP_S)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.interrupt()
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def openai_client(server: Server, key: str = "none"):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def async_openai_client(server: Server, key: str = "none"):
    import openai

    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return save_runnable_checkpoint(tmp_path_factory.mktemp("serve") / "llama", "llama")


@pytest.fixture(scope="session")
def server(checkpoint, tmp_path_factory):
    """The fast engine's torch path, MAX_SEQS sequences of CONTEXT tokens."""
    log = tmp_path_factory.mktemp("serve-log") / "stderr.txt"
    s = Server([str(checkpoint), "--context", str(CONTEXT), "--max-seqs", str(MAX_SEQS), "--engine", "fast"], log)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def small_server(checkpoint, tmp_path_factory):
    """transformers' runtime (the default on a CPU), one slot, one waiting request, an API key."""
    log = tmp_path_factory.mktemp("serve-small-log") / "stderr.txt"
    s = Server([str(checkpoint), "--context", str(SMALL_CONTEXT), "--max-seqs", "1", "--max-queue", "1",
                "--api-key", API_KEY], log)
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai_client(server)
