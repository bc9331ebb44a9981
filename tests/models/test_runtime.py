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


def test_sessions_spin_unless_told_not_to(encoder) -> None:
    """Index builds keep ONNX Runtime's spinning threads; the service (XMODAL_ORT_SPINNING off) has them sleep."""
    from models.encoder import Encoder

    quiet = Encoder(encoder.bundle_dir, spinning=False)
    key = "session.intra_op.allow_spinning"
    for modality in encoder.modalities:
        assert quiet._sessions[modality].get_session_options().get_session_config_entry(key) == "0"
        with pytest.raises(Exception, match="does not have configuration"):  # unset: ONNX Runtime's default, spin
            encoder._sessions[modality].get_session_options().get_session_config_entry(key)
    text = ["a red circle", "a violin"]
    assert abs(quiet.encode_text(text) - encoder.encode_text(text)).max() < 1e-6  # the same vectors


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


# Real sessions over a committed tower graph (xmodal-mini's image tower): what a session runs on is read back from it.
def _graph():
    from models.mini.prepare import WEIGHTS

    return WEIGHTS / "image.onnx"


def test_demanding_cuda_from_a_cpu_onnxruntime_is_a_clear_error() -> None:
    from models.runtime import create_session

    with pytest.raises(MissingDependency, match=r"device=cuda was asked for.*xmodal\[gpu\]"):
        create_session(_graph(), device="cuda")
    session, active = create_session(_graph(), device="auto")
    assert active == [CPU] and session.get_providers() == [CPU]


@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")  # ORT warns as it falls back
def test_a_session_that_falls_back_from_cuda_is_reported_not_assumed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """onnxruntime-gpu lists CUDA among its providers even when the CUDA libraries cannot load, then runs the session
    on the CPU. Faked at the boundary only (the provider list); the session is real and really runs on the CPU."""
    from models import runtime

    ort = import_onnxruntime()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    with caplog.at_level("WARNING", logger="models.runtime"):
        _, active = runtime.create_session(_graph(), device="auto")
    assert active == [CPU]  # asked for [CUDA, CPU], got the CPU: reported as such
    assert runtime.device_of(active) == "cpu"
    assert any("it runs on ['CPUExecutionProvider']" in r.getMessage() for r in caplog.records)
    with pytest.raises(MissingDependency, match="fell back"):
        runtime.create_session(_graph(), device="cuda")


def test_preloading_cuda_libraries_never_fails_a_session() -> None:
    from models.runtime import device_of, preload_cuda_libraries

    preload_cuda_libraries.cache_clear()
    assert isinstance(preload_cuda_libraries(), str)  # this CPU build has nothing to load, and says nothing or why
    assert device_of([CUDA, CPU]) == "cuda" and device_of([CPU]) == "cpu"
