"""ONNX Runtime sessions: provider selection and the providers actually active.

onnxruntime-gpu silently falls back to the CPU when CUDA cannot load, so the active providers are read
back from the session and reported, never assumed.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from models.errors import InvalidInput, MissingDependency

log = logging.getLogger(__name__)
Device = Literal["auto", "cpu", "cuda"]
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def installed(*distributions: str) -> list[str]:
    found = []
    for dist in distributions:
        try:
            metadata.version(dist)
            found.append(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def import_onnxruntime() -> Any:
    both = installed("onnxruntime", "onnxruntime-gpu")
    if len(both) == 2:  # they install the same module; whichever was installed last wins, silently
        log.warning(
            "both onnxruntime and onnxruntime-gpu are installed; keep one: the extras `cpu` and `gpu` "
            "are exclusive (pip uninstall onnxruntime onnxruntime-gpu, then install one extra)"
        )
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependency(
            "ONNX Runtime is not installed: install exactly one of the extras, "
            "`pip install 'xmodal[cpu]'` or, on a CUDA machine, `pip install 'xmodal[gpu]'`"
        ) from exc
    return onnxruntime


def choose_providers(available: list[str], device: Device = "auto") -> list[str]:
    """The provider list to ask for: CUDA first when present (or demanded), the CPU always as fallback."""
    if device not in ("auto", "cpu", "cuda"):
        raise InvalidInput(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if device == "cuda":
        raise MissingDependency(
            f"device=cuda was asked for, but this ONNX Runtime offers only {available}; "
            "install `xmodal[gpu]` (onnxruntime-gpu) instead of `xmodal[cpu]`"
        )
    return [CPU]


def device_of(active: list[str]) -> str:
    """``cuda`` when a session's providers include CUDA (nodes CUDA lacks still run on the CPU), else ``cpu``."""
    return "cuda" if CUDA in active else "cpu"


@functools.cache
def preload_cuda_libraries() -> str:
    """Load the CUDA and cuDNN libraries that the `gpu` extra installs as pip wheels (nvidia-*), once a process:
    they are not on the loader's path, and without them onnxruntime-gpu's CUDA provider fails to load and the
    session runs on the CPU. ``onnxruntime.preload_dlls`` (1.21 and later) finds them; it prints what it could not
    load, which is returned (and logged) instead. Libraries already loadable (a system CUDA) are not disturbed."""
    ort = import_onnxruntime()
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return "onnxruntime has no preload_dlls (older than 1.21): CUDA libraries must be on the loader's path"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            preload()
        except (OSError, RuntimeError) as exc:
            print(f"preload_dlls failed: {exc}")
    said = printed.getvalue().strip()
    if said:
        log.warning("onnxruntime.preload_dlls: %s", said.replace("\n", "; "))
    return said


def create_session(
    path: Path, device: Device = "auto", threads: int = 0, spinning: bool = True
) -> tuple[Any, list[str]]:
    """An inference session and the providers it really runs on. ``spinning=False``: the intra-op threads sleep
    between parallel sections instead of spinning for the next one (for a process whose other threads need the
    cores: a service; see service.settings ``ort_spinning``)."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    wanted = choose_providers(ort.get_available_providers(), device)
    if CUDA in wanted:
        preload_cuda_libraries()
    session = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
    active = session.get_providers()
    if wanted[0] not in active:
        log.warning(
            "asked ONNX Runtime for %s, it runs on %s (CUDA or cuDNN libraries missing? docs/gpu.md)", wanted, active
        )
        if device == "cuda":
            raise MissingDependency(f"CUDA was demanded but ONNX Runtime fell back to {active}")
    return session, active
