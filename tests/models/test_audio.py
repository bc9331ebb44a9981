"""Audio preprocessing: decoding real files of many formats and rates, and log-mel features that match transformers'
ClapFeatureExtractor (run here beside ours; its random choices are pinned to ours, see ``hf_features``)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from models.audio import AudioPreprocessor, audio_config_from_hf
from models.bundle import AudioPreprocessing
from models.errors import InvalidInput

FSDD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fsdd"

# The preprocessor_config.json of laion/clap-htsat-unfused (rand_trunc) and -fused (fusion), as on the hub: older
# transformers also saved derived keys (n_fft, nb_max_samples, ...), which the mapping ignores.
UNFUSED = {
    "chunk_length_s": 10,
    "feature_extractor_type": "ClapFeatureExtractor",
    "feature_size": 64,
    "fft_window_size": 1024,
    "frequency_max": 14000,
    "frequency_min": 50,
    "hop_length": 480,
    "max_length_s": 10,
    "n_fft": 1024,
    "nb_frequency_bins": 513,
    "nb_max_frames": 1000,
    "nb_max_samples": 480000,
    "padding": "repeatpad",
    "padding_side": "right",
    "padding_value": 0.0,
    "processor_class": "ClapProcessor",
    "return_attention_mask": False,
    "sampling_rate": 48000,
    "top_db": None,
    "truncation": "rand_trunc",
}
FUSED = {**UNFUSED, "truncation": "fusion"}
SMALL = {
    "feature_size": 32,
    "sampling_rate": 16000,
    "max_length_s": 2,
    "fft_window_size": 512,
    "hop_length": 160,
    "frequency_min": 0,
    "frequency_max": 8000,
    "truncation": "rand_trunc",
}
HF_KEYS = ("feature_size", "sampling_rate", "max_length_s", "fft_window_size", "hop_length", "frequency_min")
HF_KEYS += ("frequency_max", "truncation", "padding")


def preprocessor(hf_config: dict, **kwargs) -> AudioPreprocessor:
    return AudioPreprocessor(audio_config_from_hf(hf_config), **kwargs)


def signal(n: int, seed: int = 0) -> np.ndarray:
    """Noise under a slow envelope plus a tone: energy in every band, and quiet stretches near the dB floor."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    x = 0.2 * rng.standard_normal(n) * np.sin(t / 9000.0) ** 2 + 0.3 * np.sin(2 * np.pi * t / 97.0)
    return x.astype(np.float32)


def hf_features(hf_config: dict, waveforms: list[np.ndarray], monkeypatch: pytest.MonkeyPatch) -> dict:
    """The real extractor's output, with its random draws made to pick what ours picks: offset 0 for rand_trunc, and
    the first, middle and last chunk start for fusion (it draws one start from each third, in that order)."""
    transformers = pytest.importorskip("transformers")
    extractor = transformers.ClapFeatureExtractor(**{k: hf_config[k] for k in HF_KEYS if k in hf_config})
    picks = iter([lambda r: r[0], lambda r: r[len(r) // 2], lambda r: r[-1]] * len(waveforms))
    with monkeypatch.context() as m:
        m.setattr(np.random, "randint", lambda low, high=None, size=None, dtype=int: 0)
        m.setattr(np.random, "choice", lambda r, *a, **k: next(picks)(r))
        return extractor(waveforms, sampling_rate=extractor.sampling_rate, return_tensors="np")


# --- features: parity with transformers ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "hf_config",
    [
        UNFUSED,
        FUSED,
        SMALL,
        {**SMALL, "padding": "repeat"},
        {**SMALL, "padding": "pad"},
        {**SMALL, "feature_size": 64, "truncation": "fusion"},
    ],
    ids=["unfused", "fused", "small", "small-repeat", "small-pad", "small-fusion"],
)
def test_features_match_transformers(hf_config: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    pre = preprocessor(hf_config)
    n, hop = pre.clip_samples, pre.hop
    # short (padded: once, and many repeats), exact, one sample over, over by less than a hop (fusion keeps it
    # whole), and long (truncated, or fused from chunks)
    lengths = [n // 3 + 17, 701, n, n + 1, n + hop // 2, n + n // 3 + 5]
    waveforms = [signal(length, seed=i) for i, length in enumerate(lengths)]
    ours = pre(waveforms)
    hf = hf_features(hf_config, waveforms, monkeypatch)

    assert ours["input_features"].dtype == np.float32
    assert ours["input_features"].shape == hf["input_features"].shape == (len(lengths), *pre.feature_shape)
    np.testing.assert_allclose(ours["input_features"], hf["input_features"], rtol=0, atol=1e-4)
    # this batch has long clips, so transformers flips no is_longer at random: all of it is deterministic
    np.testing.assert_array_equal(ours["is_longer"], hf["is_longer"])
    assert ours["is_longer"].dtype == bool and ours["is_longer"].shape == (len(lengths), 1)


def test_feature_shapes_of_the_clap_checkpoints() -> None:
    assert preprocessor(UNFUSED).feature_shape == (1, 1001, 64)  # [B, 1, 1001, 64] into ClapAudioModel
    assert preprocessor(FUSED).feature_shape == (4, 1001, 64)
    assert preprocessor(SMALL).feature_shape == (1, 201, 32)


def test_fusion_short_batch_is_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no long clip in the batch transformers marks one clip longer at random (a training trick); we never do,
    so a clip's embedding does not depend on its batch. The features themselves match."""
    pre = preprocessor(FUSED)
    waveforms = [signal(30_000, seed=1), signal(90_000, seed=2)]
    ours = pre(waveforms)
    hf = hf_features(FUSED, waveforms, monkeypatch)
    np.testing.assert_allclose(ours["input_features"], hf["input_features"], rtol=0, atol=1e-4)
    assert not ours["is_longer"].any() and hf["is_longer"].sum() == 1
    # the four fusion channels of a short clip are the same mel
    assert (ours["input_features"][:, 1:] == ours["input_features"][:, :1]).all()


def test_long_clips_are_deterministic() -> None:
    for config in (UNFUSED, FUSED):
        pre = preprocessor(config)
        x = signal(pre.clip_samples * 2, seed=3)
        first, second = pre([x]), pre([x.copy()])
        np.testing.assert_array_equal(first["input_features"], second["input_features"])
        assert first["is_longer"].all()
    # rand_trunc keeps the start: what follows the first clip_seconds does not matter
    pre = preprocessor(UNFUSED)
    x = signal(pre.clip_samples * 2, seed=3)
    y = x.copy()
    y[pre.clip_samples :] = 0
    np.testing.assert_array_equal(pre([x])["input_features"], pre([y])["input_features"])


def test_bad_waveforms_are_refused() -> None:
    pre = preprocessor(SMALL)
    bad_waveforms = (
        np.zeros(0, np.float32),
        np.zeros((2, 100), np.float32),
        np.array([0.1, np.nan], np.float32),
        np.zeros(100, np.int16),  # integer samples: their scale is unknown
    )
    for bad in bad_waveforms:
        with pytest.raises(InvalidInput):
            pre([bad])
    x = signal(20_000)  # float64 and float16 samples are taken as they are (transformers works in float64)
    np.testing.assert_array_equal(pre([x.astype(np.float64)])["input_features"], pre([x])["input_features"])
    assert pre([x.astype(np.float16)])["input_features"].shape == (1, 1, 201, 32)
    empty = pre([])
    assert empty["input_features"].shape == (0, 1, 201, 32) and empty["is_longer"].shape == (0, 1)


# --- configs ---------------------------------------------------------------------------------------------------------
def test_config_from_hf() -> None:
    config = audio_config_from_hf(UNFUSED)
    assert config == AudioPreprocessing(
        sample_rate=48000,
        clip_seconds=10,
        n_fft=1024,
        hop_length=480,
        n_mels=64,
        f_min=50,
        f_max=14000,
        padding="repeatpad",
        truncation="rand_trunc",
    )
    assert config.clip_samples == 480_000
    assert audio_config_from_hf(FUSED).truncation == "fusion"
    assert audio_config_from_hf({}).truncation == "fusion"  # ClapFeatureExtractor's own default
    assert AudioPreprocessor.from_hf(SMALL) == audio_config_from_hf(SMALL)
    # a manifest round-trip keeps it
    assert AudioPreprocessing.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize(
    "change",
    [
        {"feature_extractor_type": "WhisperFeatureExtractor"},
        {"truncation": "max_length"},
        {"padding": "longest"},
        {"truncation": "fusion", "feature_size": 32},  # transformers shrinks fusion mels to 64 bins
        {"max_length_s": 2.00001},  # not a whole number of samples
        {"frequency_min": 9000, "frequency_max": 8000},
        {"hop_length": 0},
        {"max_length_s": 0.01, "fft_window_size": 1024},  # a clip shorter than half a window
        {"fft_window_size": 511},  # odd: transformers' frame counts and fusion chunks assume an even FFT
    ],
)
def test_unsupported_hf_configs_are_refused(change: dict) -> None:
    with pytest.raises(InvalidInput):
        audio_config_from_hf({**SMALL, **change})


# --- decoding --------------------------------------------------------------------------------------------------------
def encode(x: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    if subtype not in sf.available_subtypes(fmt):
        pytest.skip(f"this libsndfile cannot write {fmt}/{subtype}")
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(rate: int, seconds: float, freq: float = 1000.0, amplitude: float = 0.5, channels: int = 1) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    x = amplitude * np.sin(2 * np.pi * freq * t)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


@pytest.mark.parametrize(
    ("rate", "channels", "fmt", "subtype", "lossy"),
    [
        (8000, 1, "WAV", "PCM_16", False),
        (22050, 1, "WAV", "PCM_16", False),
        (44100, 2, "WAV", "PCM_16", False),
        (32000, 1, "WAV", "PCM_24", False),
        (44100, 1, "WAV", "PCM_32", False),
        (44100, 1, "WAV", "FLOAT", False),
        (48000, 1, "WAV", "PCM_16", False),
        (96000, 2, "FLAC", "PCM_24", False),
        (44100, 2, "OGG", "VORBIS", True),
        (48000, 1, "OGG", "OPUS", True),
        (44100, 1, "MP3", "MPEG_LAYER_III", True),
    ],
)
def test_decode_resamples_tones(rate: int, channels: int, fmt: str, subtype: str, lossy: bool) -> None:
    """A 1 kHz tone at amplitude 0.5 comes out at 48 kHz with its frequency and amplitude."""
    pre = preprocessor(UNFUSED)
    seconds = 2.0
    data = encode(tone(rate, seconds, channels=channels), rate, fmt, subtype)
    y = pre.decode(data)
    assert y.dtype == np.float32 and y.ndim == 1 and y.flags.c_contiguous
    assert abs(y.size - seconds * 48000) <= (0.05 * seconds * 48000 if lossy else 2)
    assert np.abs(y).max() <= 1.0
    middle = y[24000:72000].astype(np.float64)  # one second away from the edges: bin k is k Hz
    spectrum = np.abs(np.fft.rfft(middle * np.hanning(middle.size)))
    assert abs(int(np.argmax(spectrum)) - 1000) <= 1
    rms = np.sqrt(np.mean(middle**2))
    assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.1 if lossy else 0.01)


def test_decode_path_and_mono_mixdown(tmp_path: Path) -> None:
    pre = preprocessor(UNFUSED)
    left, right = tone(48000, 1.0, amplitude=0.6), tone(48000, 1.0, freq=300, amplitude=0.2)
    stereo = np.stack([left, right], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 48000, subtype="FLOAT")
    y = pre.decode(path)  # a path, at the model's rate: no resampling, so the mean is exact
    np.testing.assert_allclose(y, (left + right) / 2, atol=1e-7)
    assert np.array_equal(pre.decode(str(path)), y)
    # four channels, int16
    quad = np.stack([left, -left, right, right], axis=1)
    y = pre.decode(encode(quad, 48000, "WAV", "PCM_16"))
    np.testing.assert_allclose(y, right / 2, atol=2 / 32768)


def test_decode_sample_formats_and_range() -> None:
    pre = preprocessor(SMALL)
    full_scale = np.array([-32768, 32767, 0, 16384], dtype=np.int16)
    y = pre.decode(encode(full_scale, 16000, "WAV", "PCM_16"))
    np.testing.assert_allclose(y, [-1.0, 32767 / 32768, 0.0, 0.5])
    loud = np.full(1000, 1.5, dtype=np.float32)  # a float WAV may exceed full scale; the model expects [-1, 1]
    assert pre.decode(encode(loud, 16000, "WAV", "FLOAT")).max() == 1.0
    with pytest.raises(InvalidInput, match="NaN"):
        pre.decode(encode(np.array([0.1, np.nan, 0.2], dtype=np.float32), 16000, "WAV", "FLOAT"))


@pytest.mark.parametrize(
    "data",
    [b"", b"not audio at all " * 100, np.random.default_rng(0).bytes(20_000), b"RIFF\x24\x00\x00\x00WAVEjunkjunk"],
    ids=["empty", "text", "random", "bad-wav-header"],
)
def test_decode_refuses_non_audio(data: bytes) -> None:
    with pytest.raises(InvalidInput):
        preprocessor(SMALL).decode(data)


def test_decode_refuses_bad_sources(tmp_path: Path) -> None:
    pre = preprocessor(SMALL)
    with pytest.raises(InvalidInput, match="no audio file"):
        pre.decode(tmp_path / "missing.wav")
    with pytest.raises(InvalidInput):
        pre.decode(12345)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="no samples"):
        pre.decode(encode(np.zeros(0), 16000, "WAV", "PCM_16"))


@pytest.mark.parametrize(("fmt", "subtype"), [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_truncated_compressed_files_are_refused(fmt: str, subtype: str) -> None:
    """Where the format says how long it is (or the decoder notices), a file cut in half is refused."""
    data = encode(tone(22050, 2.0) * np.linspace(0, 1, 44100), 22050, fmt, subtype)
    with pytest.raises(InvalidInput, match="truncated|corrupt"):
        preprocessor(SMALL).decode(data[: len(data) // 2])


def test_truncated_wav_decodes_what_is_there() -> None:
    """A WAV cut short looks like one streamed with an unknown length (libsndfile trusts the bytes present), so the
    samples present are decoded: a clean partial decode, never an exception from soundfile."""
    x = tone(16000, 2.0)
    data = encode(x, 16000, "WAV", "PCM_16")
    y = preprocessor(SMALL).decode(data[: 44 + 2 * 16000 + 1])  # header, one second, half a sample
    assert y.size == 16000
    np.testing.assert_allclose(y, x[:16000], atol=1 / 32768)


def test_too_long_is_refused_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(tone(8000, 5.0), 8000, "FLAC", "PCM_16")
    pre = preprocessor(SMALL, max_seconds=4.0)

    def never(*args, **kwargs):
        raise AssertionError("decoded samples of a file it should have refused from its header")

    monkeypatch.setattr(sf.SoundFile, "read", never)
    monkeypatch.setattr(sf.SoundFile, "blocks", never)
    with pytest.raises(InvalidInput, match="too long") as info:
        pre.decode(data)
    assert info.value.details["max_seconds"] == 4.0
    monkeypatch.undo()
    assert preprocessor(SMALL, max_seconds=5.0).decode(data).size == 5 * 16000


# --- real recordings -------------------------------------------------------------------------------------------------
def fsdd_files(n: int = 30) -> list[Path]:
    recordings = FSDD / "recordings"
    if not recordings.is_dir():
        pytest.skip(f"the spoken digits data set is not at {FSDD}")
    files = sorted(recordings.glob("*.wav"))
    return files[:: max(1, len(files) // n)][:n]


def test_fsdd_spoken_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real 8 kHz speech: decoded to 48 kHz mono with sensible durations, and featurised as transformers does."""
    files = fsdd_files()
    pre = preprocessor(UNFUSED)
    waveforms = [pre.decode(path) for path in files]
    for path, y in zip(files, waveforms, strict=True):
        info = sf.info(path)
        assert info.samplerate == 8000
        assert y.dtype == np.float32 and y.ndim == 1
        assert 0.1 <= y.size / 48000 <= 3.0, path.name
        assert y.size == pytest.approx(info.frames * 6, abs=6)
        assert 0 < np.abs(y).max() <= 1.0
    ours = pre(waveforms)
    hf = hf_features(UNFUSED, waveforms, monkeypatch)
    np.testing.assert_allclose(ours["input_features"], hf["input_features"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(ours["is_longer"], hf["is_longer"])
