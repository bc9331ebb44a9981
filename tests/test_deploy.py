"""Deployment files, checked without a Docker engine: compose structure, real commands, Dockerfile
rules, and the README's two set-up commands (the ones CI and the Dockerfile use too)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
XMODAL = [sys.executable, "-m", "service"]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def stages(dockerfile: str) -> dict[str, str]:
    parts = re.split(r"^FROM\s+", dockerfile, flags=re.M)[1:]
    return {p.split()[2] if " AS " in p.splitlines()[0] else str(i): p for i, p in enumerate(parts)}


def test_compose_services_and_dependencies(compose: dict) -> None:
    services = {name: s for name, s in compose["services"].items() if "profiles" not in s}
    assert set(services) == {"redis", "demo-index", "api", "worker"}
    redis = services["redis"]
    assert redis["image"].startswith("redis:") and "redis-cli" in redis["healthcheck"]["test"]
    api = services["api"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["depends_on"]["demo-index"]["condition"] == "service_completed_successfully"
    assert api["environment"]["XMODAL_REDIS_URL"].startswith("redis://redis:6379")
    assert any(p.endswith(":8000") for p in api["ports"])
    worker = services["worker"]
    assert worker["command"] == ["xmodal", "worker"] and worker["image"] == services["demo-index"]["image"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["environment"]["XMODAL_REDIS_URL"] == api["environment"]["XMODAL_REDIS_URL"]
    one_shot = services["demo-index"]
    assert one_shot["restart"] == "no" and one_shot["build"] == "."
    for name in ("api", "demo-index", "worker"):  # all share the data volume the Dockerfile declares
        assert "xmodal-data:/data" in services[name]["volumes"]
    assert "xmodal-data" in compose["volumes"]


def test_the_gpu_profile_runs_the_api_and_the_worker_on_a_gpu(compose: dict) -> None:
    services = compose["services"]
    gpu = {name for name, s in services.items() if "gpu" in s.get("profiles", [])}
    assert gpu == {"api-gpu", "worker-gpu"}
    assert services["api-gpu"]["build"]["args"]["EXTRAS"] == "gpu"  # the runtime stage's ARG
    assert "ARG EXTRAS=cpu" in (ROOT / "Dockerfile").read_text()
    for name in gpu:
        s = services[name]
        assert s["image"] == "xmodal:gpu" and s["environment"]["XMODAL_DEVICE"] == "cuda"
        (device,) = s["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert s["command"] == services[name.removesuffix("-gpu")]["command"]
        assert "xmodal-data:/data" in s["volumes"]


def test_every_compose_command_is_a_real_xmodal_command(compose: dict) -> None:
    commands = [s["command"] for s in compose["services"].values() if s.get("command", [""])[0] == "xmodal"]
    dockerfile_cmd = re.search(r'^CMD \["xmodal", (.*)\]$', (ROOT / "Dockerfile").read_text(), re.M)
    assert dockerfile_cmd, "the image's CMD should be an xmodal command"
    commands.append(["xmodal"] + [a.strip(' "') for a in dockerfile_cmd.group(1).split(",")])
    assert len(commands) == 6
    for cmd in commands:
        args = [a for a in cmd[1:] if not a.startswith("--")]  # the sub-command path; options checked below
        r = subprocess.run([*XMODAL, *args, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (cmd, r.stderr)
        for opt in (a for a in cmd[1:] if a.startswith("--")):
            assert opt in r.stdout, f"{opt} is not an option of {' '.join(cmd)}"


def test_dockerfile_is_multi_stage_torch_free_and_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    st = stages(text)
    assert list(st) == ["builder", "runtime"]
    builder, runtime = st["builder"], st["runtime"]
    assert "make install EXTRAS=cpu,export" in builder and "xmodal models prepare" in builder
    # the runtime installs the ARG's extra (cpu by default, gpu for the CUDA image), never export (torch)
    assert "ARG EXTRAS=cpu\n" in runtime and "make install EXTRAS=${EXTRAS} " in runtime
    assert "export" not in runtime.split("make install")[1].split("\n")[0]
    assert "COPY --from=builder /opt/xmodal/models" in runtime
    user = re.search(r"^USER (\S+)", runtime, re.M)
    assert user and user.group(1) not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*", runtime, re.M) and "/healthz" in runtime
    assert "XMODAL_MODELS_DIR=/opt/xmodal/models" in runtime


def test_docker_context_leaves_out_the_venv_and_data() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv/", "data/", ".git/"} <= ignored


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_second() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: install\n\t\$\(BIN\)/xmodal demo$", makefile, re.M)


def test_every_cli_command_has_help_with_an_example() -> None:
    groups = {
        "": ["serve", "demo", "worker"],
        "jobs": ["list", "show"],
        "models": ["list", "info", "prepare", "export", "quantize", "train"],
        "index": ["build", "info", "verify", "publish"],
    }
    for group, names in groups.items():
        for name in names:
            args = [group, name] if group else [name]
            r = subprocess.run([*XMODAL, *args, "--help"], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and "Example" in r.stdout, (args, r.stdout, r.stderr)
