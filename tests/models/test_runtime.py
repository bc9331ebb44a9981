"""Provider selection and the missing-dependency errors (no GPU needed to check the choice logic)."""

from __future__ import annotations

import sys

import pytest

from models.errors import InvalidInput, MissingDependency
from models.runtime import CPU, CUDA, choose_providers, import_onnxruntime


def test_cuda_first_when_available() -> None:
    assert choose_providers([CUDA, CPU], "auto") == [CUDA, CPU]
    assert choose_providers([CUDA, CPU], "cuda") == [CUDA, CPU]


def test_cpu_when_asked_or_no_cuda() -> None:
    assert choose_providers([CUDA, CPU], "cpu") == [CPU]
    assert choose_providers([CPU], "auto") == [CPU]
    assert choose_providers(["AzureExecutionProvider", CPU], "auto") == [CPU]


def test_demanding_cuda_without_it_is_an_error() -> None:
    with pytest.raises(MissingDependency, match=r"xmodal\[gpu\]"):
        choose_providers([CPU], "cuda")
    with pytest.raises(InvalidInput):
        choose_providers([CPU], "tpu")  # type: ignore[arg-type]


def test_session_reports_active_providers(encoder) -> None:
    assert encoder.providers == {m: [CPU] for m in encoder.modalities}  # one session per tower, all on the CPU here
    assert set(encoder.modalities) == {"text", "image", "audio"}


def test_missing_onnxruntime_names_both_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(MissingDependency) as err:
        import_onnxruntime()
    assert "xmodal[cpu]" in err.value.message and "xmodal[gpu]" in err.value.message


def test_missing_faiss_names_both_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    from indexer.faiss_backend import import_faiss

    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(MissingDependency, match=r"xmodal\[cpu\]"):
        import_faiss()
