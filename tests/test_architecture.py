"""The dependency direction, lint, and a torch-free serving path, checked on every run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (it comes with the `dev` extra)")
    return found


def test_import_contracts_hold() -> None:
    r = run([tool("lint-imports"), "--no-cache"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "5 kept, 0 broken" in r.stdout


def test_ruff_is_clean() -> None:
    r = run([tool("ruff"), "check", "."])
    assert r.returncode == 0, r.stdout + r.stderr


def test_serving_a_search_never_imports_torch(served_data: Path) -> None:
    """Build the app, answer a real search, then look at what got imported."""
    code = f"""
import json, sys
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings
with TestClient(create_app(Settings(data_dir={str(served_data)!r}, reload_interval_s=0))) as c:
    r = c.post("/v1/search", json={{"index": "demo", "query": {{"text": "a comet"}}, "k": 2}})
    assert r.status_code == 200, r.text
heavy = sorted(m for m in ("torch", "transformers", "onnx", "sentence_transformers") if m in sys.modules)
print(json.dumps(heavy))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_")}
    r = run([sys.executable, "-c", code], env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_importing_the_packages_does_no_work() -> None:
    """Nothing happens at import: no model, FAISS or ONNX Runtime loaded by importing the modules."""
    code = """
import sys, importlib, pkgutil, json
for pkg in ("models", "indexer", "service"):
    mod = importlib.import_module(pkg)
    for info in pkgutil.iter_modules(mod.__path__):
        if info.name != "__main__":  # the CLI entry point runs the CLI by design
            importlib.import_module(f"{pkg}.{info.name}")
print(json.dumps(sorted(m for m in ("faiss", "onnxruntime", "torch", "ray") if m in sys.modules)))
"""
    r = run([sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
