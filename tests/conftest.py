"""Shared fixtures: a pretrained tiny model (built once per session), a private redis-server, free ports.

The tiny model is cached across sessions under MEMFIT_TEST_CACHE (default .pytest_cache/memfit-tiny in
the repository, git-ignored) keyed by the hash of the code that builds it, so a second `make test`
does not pay for the build again while a changed recipe always rebuilds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_c(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter of this venv, from the repository root (an import check that
    the test process's own imports cannot hide)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


def _recipe_hash() -> str:
    h = hashlib.sha256()
    for rel in [
        "memlm/pretrain.py",
        "memlm/presets.py",
        "memlm/training.py",
        "memlm/tokenizer.py",
        "memlm/background.py",
        "memlm/modeling.py",
        "memlm/memory.py",
        "memlm/config.py",
    ]:
        p = ROOT / rel
        if p.exists():
            h.update(p.read_bytes())
    for p in sorted((ROOT / "memlm" / "data").glob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A pretrained `tiny` preset model directory (with background statistics and probe set)."""
    from memlm.pretrain import pretrain

    cache_root = Path(os.environ.get("MEMFIT_TEST_CACHE", ROOT / ".pytest_cache" / "memfit-tiny"))
    target = cache_root / _recipe_hash()
    if not (target / "config.json").exists() or not (target / "background.safetensors").exists():
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix="build-"))
        pretrain("tiny", tmp / "model", progress=False)
        if target.exists():
            shutil.rmtree(target)
        (tmp / "model").rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@pytest.fixture
def tiny_model_copy(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model that a test may modify."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


class RedisServer:
    def __init__(self, port: int, proc: subprocess.Popen, workdir: Path):
        self.port = port
        self.proc = proc
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def start(self) -> None:
        """(Re)start on the same port (for fault tests)."""
        self.proc = _spawn_redis(self.port, self.workdir)


def _spawn_redis(port: int, workdir: Path) -> subprocess.Popen:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: `make test` installs the Debian package redis-server")
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail(f"private redis-server did not start on port {port}")


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server on a free port (never the machine's shared one)."""
    port = free_port()
    server = RedisServer(port, _spawn_redis(port, tmp_path), tmp_path)
    yield server
    server.stop()
