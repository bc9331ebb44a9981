"""Audio preprocessing without torch: decode untrusted bytes with libsndfile (soundfile), resample with soxr, and
reproduce transformers' ``ClapFeatureExtractor`` log-mel features with numpy.

Parity matters more than elegance: the ONNX audio tower only gives the checkpoint's embeddings if its input is the
tensor the extractor made at training and export time, so every step copies what transformers does (its mel filter
banks, centred reflect-padded STFT with a periodic Hann window, the complex64 rounding of its STFT, power → dB with a
1e-10 floor, its repeat/pad rules). Where transformers draws random numbers we choose deterministically, so one clip
always gets one embedding:

- ``rand_trunc``: a clip longer than ``clip_seconds`` keeps its first ``clip_seconds`` (transformers: random offset).
- ``fusion``, long clip: the first, middle and last chunk (transformers: a random chunk from each third).
- ``fusion``, batch with no long clip: every ``is_longer`` stays False (transformers flips one at random, a trick
  to train the fusion layers that would make a short clip's embedding depend on its batch).

``tests/models/test_audio.py`` checks all of it against the real extractor.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from models.bundle import AudioPreprocessing
from models.cost import DecodeCost
from models.errors import InvalidInput

_MEL_FLOOR = 1e-10  # transformers' mel_floor and power_to_db min_value: silence is -100 dB
# STFT frames per FFT call. Small blocks (~1 MB of float64 work arrays) stay in cache and under malloc's mmap threshold:
# twice as fast as one 10-second block, and memory stays flat for long clips (fusion transforms all of a clip).
_FRAMES_PER_BLOCK = 128
_DECODE_SAMPLES = 1 << 20  # samples per read: a header claiming 1000 channels cannot make us allocate gigabytes


@contextlib.contextmanager
def _refusals(what: str) -> Iterator[None]:
    """Whatever libsndfile raises on untrusted bytes, as InvalidInput saying why."""
    try:
        yield
    except InvalidInput:
        raise
    except sf.LibsndfileError as exc:
        if exc.code == 1:  # SF_ERR_UNRECOGNISED_FORMAT
            raise InvalidInput(f"{what} is not in a format we read (WAV, FLAC, OGG, MP3, ...)") from exc
        raise InvalidInput(f"corrupt or truncated {what}: {exc.error_string}") from exc
    except Exception as exc:  # the bindings also raise RuntimeError, TypeError, ValueError on odd headers
        raise InvalidInput(f"corrupt or truncated {what}: {exc}") from exc


# --- mel filter banks (transformers.audio_utils.mel_filter_bank, same float64 arithmetic) -----------------------------
def _hz_to_mel(hz: np.ndarray | float, scale: str) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    # Slaney: linear below 1 kHz, logarithmic above
    linear = 3.0 * hz / 200.0
    return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * (27.0 / np.log(6.4)), linear)


def _mel_to_hz(mel: np.ndarray, scale: str) -> np.ndarray:
    if scale == "htk":
        return 700.0 * (np.power(10, mel / 2595.0) - 1.0)
    linear = 200.0 * mel / 3.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), linear)


def mel_filter_bank(config: AudioPreprocessing) -> np.ndarray:
    """[n_fft // 2 + 1, n_mels] float64: the bank ClapFeatureExtractor uses for the config's truncation mode."""
    scale, norm = ("htk", False) if config.truncation == "fusion" else ("slaney", True)
    n_bins = config.n_fft // 2 + 1
    mel_points = np.linspace(_hz_to_mel(config.f_min, scale), _hz_to_mel(config.f_max, scale), config.n_mels + 2)
    edges = _mel_to_hz(mel_points, scale)
    fft_freqs = np.linspace(0, config.sample_rate // 2, n_bins)  # sic: integer Nyquist, as transformers has it
    slopes = edges[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / np.diff(edges)[:-1]
    up = slopes[:, 2:] / np.diff(edges)[1:]
    bank = np.maximum(0.0, np.minimum(down, up))
    if norm:  # Slaney area normalisation: roughly constant energy per band
        bank *= 2.0 / (edges[2:] - edges[:-2])[None, :]
    return bank


# --- features ---------------------------------------------------------------------------------------------------------
class AudioPreprocessor:
    """``decode`` turns bytes or a file into a mono float32 waveform at ``config.sample_rate`` (or refuses with
    InvalidInput); calling the preprocessor on a list of waveforms gives the tower's inputs: ``input_features``
    float32 [B, C, T, n_mels] (C = 1, or 4 for fusion; T = clip_samples // hop_length + 1) and ``is_longer``
    bool [B, 1]."""

    def __init__(self, config: AudioPreprocessing, max_seconds: float = 600.0) -> None:
        self.config = config
        self.max_seconds = max_seconds
        self.n_fft = config.n_fft
        self.hop = config.hop_length
        self.clip_samples = config.clip_samples
        self.window = np.hanning(self.n_fft + 1)[:-1]  # periodic Hann, as torch.hann_window and transformers
        self.filters = mel_filter_bank(config)
        # The bank is sparse (each triangle spans a few bins, ~2% of it is non-zero), so mel energies are sums over
        # its non-zero (bin, weight) pairs grouped by filter. Faster than a dense matmul, and free of BLAS threads,
        # which make small products 10-50x slower on a busy machine.
        filt, self._bins = np.nonzero(self.filters.T)  # grouped by filter, bins ascending
        self._weights = self.filters[self._bins, filt]
        self._filled = np.unique(filt)  # a filter with no bin (too many mels for the FFT) stays 0, as in transformers
        self._starts = np.searchsorted(filt, self._filled)
        self.channels = 4 if config.truncation == "fusion" else 1
        self.frames = self.clip_samples // self.hop + 1  # centred STFT of one clip (== transformers' chunk_frames)

    @classmethod
    def from_hf(cls, feature_extractor_config: dict[str, Any]) -> AudioPreprocessing:
        return audio_config_from_hf(feature_extractor_config)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """One clip's input_features shape: (C, T, n_mels)."""
        return self.channels, self.frames, self.config.n_mels

    # --- decoding ---------------------------------------------------------------------------------------------------
    def decode_cost(self, data: bytes) -> DecodeCost:
        """The memory ``decode`` and the features will take for these bytes, from the header alone: the mono blocks and
        their concatenation, one read block of every channel, the resampled copy (twice: soxr's output and the clip),
        then the kept waveform and the log-mel of all of it (fusion transforms the whole clip)."""
        if not len(data):
            raise InvalidInput("empty audio: no bytes")
        with _refusals("audio data"), sf.SoundFile(io.BytesIO(bytes(data))) as f:
            rate, channels, declared = f.samplerate, f.channels, f.frames
            self._check_header(rate, channels, declared, "audio data")
        resampled = int(declared * self.config.sample_rate / rate) + 1
        block = 4 * min(declared, max(1, _DECODE_SAMPLES // channels)) * (channels + 1)
        mel = 12 * self.config.n_mels * (max(resampled, self.clip_samples) // self.hop + 1)  # float64 + float32
        kept = 4 * max(resampled, self.clip_samples) + mel
        return DecodeCost(peak=8 * declared + 8 * resampled + block, kept=kept)

    def _check_header(self, rate: int, channels: int, declared: int, what: str) -> None:
        if declared <= 0 or channels <= 0:
            raise InvalidInput(f"{what} has no samples")
        if declared > self.max_seconds * rate:
            raise InvalidInput(
                f"{what} too long: {declared / rate:.1f} s, over the limit of {self.max_seconds:g} s",
                seconds=declared / rate,
                max_seconds=self.max_seconds,
            )

    def decode(self, data: bytes | str | os.PathLike[str]) -> np.ndarray:
        """The bytes of an audio file, or its path → mono float32 in [-1, 1] at the model's sample rate.

        Formats: whatever libsndfile reads (WAV, FLAC, OGG Vorbis/Opus, MP3, AIFF, ...), any rate, any channel count
        (averaged to mono), integer or float samples. Refused with InvalidInput: not audio, corrupt, no samples, longer
        than ``max_seconds`` (judged from the header, before decoding), or truncated where the format lets us tell
        (the decoder fails, or yields fewer frames than the header declares: FLAC, OGG, MP3). A WAV/AIFF cut short is
        indistinguishable from one streamed with an unknown length, so its samples present are decoded."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            if not len(data):
                raise InvalidInput("empty audio: no bytes")
            source: Any = io.BytesIO(bytes(data))
            what = "audio data"
        elif isinstance(data, (str, os.PathLike)):
            source = Path(data)
            if not source.is_file():
                raise InvalidInput(f"no audio file at {source}")
            what = f"audio file {source.name}"
        else:
            raise InvalidInput(f"audio is given as bytes or a path, not {type(data).__name__}")
        with _refusals(what), sf.SoundFile(source) as f:
            rate, channels, declared = f.samplerate, f.channels, f.frames
            self._check_header(rate, channels, declared, what)
            # Our own loop, not SoundFile.blocks(): that one yields uninitialised memory after a short read.
            blocks, got, step = [], 0, max(1, _DECODE_SAMPLES // channels)
            while got < declared:
                block = f.read(min(step, declared - got), dtype="float32", always_2d=True)
                if not len(block):  # the data ends before the header's count (refused below)
                    break
                blocks.append(_mixdown(block))
                got += len(block)
        mono = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
        if mono.size < declared:
            raise InvalidInput(f"truncated {what}: {mono.size} of the {declared} frames its header declares")
        if not np.isfinite(mono).all():
            raise InvalidInput(f"{what} has NaN or infinite samples")
        if rate != self.config.sample_rate:
            try:
                mono = soxr.resample(mono, rate, self.config.sample_rate, quality="HQ")
            except Exception as exc:  # an absurd rate in a header
                raise InvalidInput(f"cannot resample {what} from {rate} Hz: {exc}") from exc
            if mono.size == 0:
                raise InvalidInput(f"{what} is too short: no samples left at {self.config.sample_rate} Hz")
        # Float files may exceed full scale, and resampling overshoots near it (Gibbs); the model expects [-1, 1].
        return np.clip(mono, -1.0, 1.0, out=mono).astype(np.float32, copy=False)

    # --- features ---------------------------------------------------------------------------------------------------
    def __call__(self, waveforms: list[np.ndarray]) -> dict[str, np.ndarray]:
        features = np.empty((len(waveforms), *self.feature_shape), dtype=np.float32)
        is_longer = np.zeros((len(waveforms), 1), dtype=bool)
        for i, waveform in enumerate(waveforms):
            features[i], is_longer[i, 0] = self.features(waveform)
        return {"input_features": features, "is_longer": is_longer}

    def features(self, waveform: np.ndarray) -> tuple[np.ndarray, bool]:
        """One mono waveform at the model's rate → ([C, T, n_mels] float32, is_longer)."""
        x = np.asarray(waveform)
        if x.ndim != 1 or x.size == 0:
            raise InvalidInput(f"a waveform is a non-empty 1-D array of samples, not shape {x.shape}")
        if x.dtype.kind != "f":
            raise InvalidInput(f"a waveform holds float samples in [-1, 1], not {x.dtype}")
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float64)
        # float32 stays float32 (a 10-minute clip is 115 MB, not 230): padding and tiling are exact in either, and
        # the per-block window product upcasts to float64, where transformers computes.
        if not np.isfinite(x).all():
            raise InvalidInput("waveform has NaN or infinite samples")
        n = self.clip_samples
        if x.size > n:
            if self.config.truncation == "rand_trunc":
                return self.log_mel(x[:n])[None], True
            return self._fusion(self.log_mel(x))
        if x.size < n:
            if self.config.padding == "repeat":  # whole copies, the last one cut
                x = np.tile(x, n // x.size + 1)[:n]
            elif self.config.padding == "repeatpad":  # whole copies, then silence
                x = np.tile(x, n // x.size)
            x = np.pad(x, (0, n - x.size))
        mel = self.log_mel(x)
        return (np.broadcast_to(mel, (4, *mel.shape)) if self.channels == 4 else mel[None]), False

    def log_mel(self, x: np.ndarray) -> np.ndarray:
        """Waveform → [frames, n_mels] float32 dB: transformers' ``spectrogram`` (centre=True, reflect pad,
        power 2, mel floor, power_to_db with reference 1), vectorised over frames."""
        half = self.n_fft // 2
        padded = np.pad(x, (half, half), mode="reflect")
        frames = np.lib.stride_tricks.sliding_window_view(padded, self.n_fft)[:: self.hop]  # a view, no copy
        out = np.empty((len(frames), self.filters.shape[1]), dtype=np.float32)
        for start in range(0, len(frames), _FRAMES_PER_BLOCK):
            spec = np.fft.rfft(frames[start : start + _FRAMES_PER_BLOCK] * self.window, axis=-1)
            # transformers stores the STFT as complex64 before squaring; copying that rounding keeps bins far below
            # a frame's peak within float32 noise of it.
            power = np.abs(spec.astype(np.complex64), dtype=np.float64) ** 2
            weighted = power[:, self._bins] * self._weights
            mel = np.zeros((len(power), self.config.n_mels))
            mel[:, self._filled] = np.add.reduceat(weighted, self._starts, axis=1)
            out[start : start + _FRAMES_PER_BLOCK] = 10.0 * np.log10(np.maximum(mel, _MEL_FLOOR))
        return out

    def _fusion(self, mel: np.ndarray) -> tuple[np.ndarray, bool]:
        """transformers' ``_random_mel_fusion`` with fixed picks: the whole mel shrunk to one chunk's length, then
        the first chunk, the middle one of the middle third's starts, and the last chunk."""
        chunk, total = self.frames, mel.shape[0]
        if total == chunk:  # longer than the clip by less than a hop: transformers keeps it whole, not "longer"
            return np.broadcast_to(mel, (4, *mel.shape)), False
        thirds = np.array_split(np.arange(total - chunk + 1), 3)
        middle = thirds[1][len(thirds[1]) // 2] if len(thirds[1]) else 0
        last = thirds[2][-1] if len(thirds[2]) else 0
        chunks = [mel[s : s + chunk] for s in (0, middle, last)]
        return np.stack([_shrink_time(mel, chunk), *chunks]), True


def _mixdown(block: np.ndarray) -> np.ndarray:
    """[frames, channels] → the channel mean, [frames]. Column by column: ``mean(axis=1)`` over a short axis is ~30x
    slower, and a matrix product would bring in BLAS threads."""
    mono = block[:, 0].copy()
    for channel in range(1, block.shape[1]):
        mono += block[:, channel]
    if block.shape[1] > 1:
        mono *= np.float32(1 / block.shape[1])
    return mono


def _shrink_time(mel: np.ndarray, size: int) -> np.ndarray:
    """torch ``interpolate(mode="bilinear", align_corners=False)`` of a float32 [T, M] array to [size, M]. The mel
    axis keeps its size, so only time is interpolated. Same arithmetic as torch's CPU kernel: a float32 scale, source
    positions in float64 rounded to float32, and ``fma(x0, w0, x1 * w1)`` (emulated in float64)."""
    total = mel.shape[0]
    scale = float(np.float32(total) / np.float32(size))
    src = np.maximum(scale * (np.arange(size) + 0.5) - 0.5, 0).astype(np.float32)
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, total - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1)[:, None]
    w0 = np.float32(1) - w1
    return ((mel[i1] * w1).astype(np.float64) + mel[i0].astype(np.float64) * w0).astype(np.float32)


# --- Hugging Face configs ---------------------------------------------------------------------------------------------
# ClapFeatureExtractor's defaults, for the keys a preprocessor_config.json may leave out.
_CLAP_DEFAULTS: dict[str, Any] = {
    "feature_size": 64,
    "sampling_rate": 48_000,
    "hop_length": 480,
    "max_length_s": 10,
    "fft_window_size": 1024,
    "frequency_min": 0,
    "frequency_max": 14_000,
    "truncation": "fusion",
    "padding": "repeatpad",
}


def audio_config_from_hf(config: dict[str, Any]) -> AudioPreprocessing:
    """A checkpoint's preprocessor_config.json (``ClapFeatureExtractor``) → AudioPreprocessing.

    ``top_db``, ``padding_value`` and ``return_attention_mask`` are accepted and ignored, as the extractor itself
    ignores them (it always pads with zeros and never clips the dB range)."""
    kind = config.get("feature_extractor_type", "ClapFeatureExtractor")
    if kind != "ClapFeatureExtractor":
        raise InvalidInput(f"audio feature extractor {kind} is not supported (only ClapFeatureExtractor)")
    cfg = {**_CLAP_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if cfg["truncation"] not in ("rand_trunc", "fusion"):
        raise InvalidInput(f"truncation={cfg['truncation']!r} is not supported (rand_trunc or fusion)")
    if cfg["padding"] not in ("repeatpad", "repeat", "pad"):
        raise InvalidInput(f"padding={cfg['padding']!r} is not supported (repeatpad, repeat or pad)")
    if cfg["truncation"] == "fusion" and cfg["feature_size"] != 64:
        # transformers shrinks the whole mel to exactly 64 bins for fusion, which only stacks with 64-bin chunks
        raise InvalidInput(f"fusion needs feature_size 64 (transformers hard-codes it), not {cfg['feature_size']}")
    try:
        return AudioPreprocessing(
            sample_rate=int(cfg["sampling_rate"]),
            clip_seconds=float(cfg["max_length_s"]),
            n_fft=int(cfg["fft_window_size"]),
            hop_length=int(cfg["hop_length"]),
            n_mels=int(cfg["feature_size"]),
            f_min=float(cfg["frequency_min"]),
            f_max=float(cfg["frequency_max"]),
            padding=cfg["padding"],
            truncation=cfg["truncation"],
        )
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise InvalidInput(f"unsupported audio feature extractor settings: {exc}") from exc
