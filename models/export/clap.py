"""Export a Hugging Face ``ClapModel`` checkpoint folder (LAION CLAP: RoBERTa text, HTSAT audio) to a two-tower
xmodal bundle. Each tower is one ONNX graph with the bundle contract's outputs, all L2-normalised:

text (inputs ``input_ids, attention_mask``, as the checkpoint's RoBERTa tokenizer makes them; dynamic batch and length)
  ``embedding`` [B, D]  exactly ``get_text_features`` (pooler on ``<s>``: dense + tanh, then ``text_projection``).
  ``tokens`` [B, T, D]  every position's last hidden state through the *same* head: pooler dense + tanh, then
                        ``text_projection``. So the ``<s>`` token's vector is the embedding.
  ``token_mask`` [B, T] int32, the attention mask.
audio (input ``input_features`` [B, C, frames, n_mels] as ``ClapFeatureExtractor`` / ``models.audio`` make them,
       C = 1; fused checkpoints: C = 4 and a second input ``is_longer`` bool [B, 1]; dynamic batch)
  ``embedding`` [B, D]  exactly ``get_audio_features``.
  ``tokens`` [B, N, D]  one vector per time step of HTSAT's final feature map, averaged over its frequency rows,
                        through ``audio_projection`` (N = 32 for the released checkpoints: ~0.32 s of a 10 s clip each).
  ``token_mask`` [B, N] int32, all ones.

Decisions, and why:

- Text tokens go through the pooler's dense + tanh before the projection, not straight into ``text_projection``.
  The projection was trained only on pooler outputs (tanh-bounded); raw hidden states come out of a LayerNorm with
  another scale and offset, so they would land off the joint space. With the whole head applied per position, a
  token is "the embedding the text would have if pooled at this position", and ``<s>`` reproduces the embedding
  (as CLIP's EOS token does in ``models.export.clip``). ``<s>`` and ``</s>`` stay real tokens (mask = attention mask).
- Audio tokens are time steps. HTSAT ends in a [C, F', T'] map (``last_hidden_state``: F' frequency rows, T' time
  steps in time order after its "group 2D CNN" regrouping of the 4 time chunks); the embedding is
  ``audio_projection(mean over all F' x T' positions)``. Averaging over F' first gives T' vectors whose mean is that
  same pooled vector, and each goes through ``audio_projection`` like the pooled one: a token is the embedding of
  what sounds in that ~0.3 s, the MaskCLIP argument. Not F' x T' tokens: a band of half the mel range at one instant
  is not a sound on its own, and it would double the token storage.
- ``token_mask`` is all ones for audio: the features carry no padding information (``repeatpad`` fills a short clip
  with copies of itself; ``pad`` with silence, whose tokens are what the model makes of silence).
- ``is_longer`` is a graph input only for fused checkpoints (``enable_fusion``), whose ``get_audio_features`` uses it;
  unfused ones ignore it, so their graph does not take it. HTSAT's fusion branch selects the longer clips with
  ``torch.where(is_longer)`` and runs the local branch on those rows only, which the dynamo exporter cannot trace
  (a data-dependent size, "GuardOnDataDependentSymNode" at ``len(is_longer_idx) > 0``). For export the patch
  embedding is swapped for an equivalent one that runs the fusion branch on every row and keeps it where
  ``is_longer`` (the branch is per row: eval BatchNorm, per-sample pooling); parity is measured against the
  unmodified transformers model, with ``is_longer`` both ways.
- The feature truncation mode follows the model, not the preprocessor config: an unfused model can only take one
  mel channel (``rand_trunc``; its 1-channel patch convolution rejects fusion's 4), a fused one is fed fusion's 4
  channels. A config saying otherwise is overridden with a warning, recorded in the manifest's ``source``.
- The audio time length is fixed by the clip length (the preprocessing pads or truncates every clip to it; HTSAT
  then resizes to its spectrogram size), so only the batch axis is dynamic.

Parity is part of the export: torch and ONNX Runtime on other batch sizes (and, for text, other lengths with padding
inside batches, and a text truncated to the longest length) than the traces; every row's cosine >= 0.9999 and every
element within 1e-4 (``models.export.base.MIN_COSINE`` / ``MAX_ABS``) for the embedding and for the real tokens, the
token mask exactly. Otherwise ParityError and no bundle.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import AudioPreprocessing, ModelManifest, TextPreprocessing
from models.errors import ExportError, XmodalError
from models.export.base import (
    TowerExport,
    declared_max_length,
    export_bundle,
    import_torch,
    pad_id_of,
    text_tower,
    tower_module,
    tower_outputs,
    write_tokenizer,
)

log = logging.getLogger(__name__)

TEXT_INPUTS = ["input_ids", "attention_mask"]
AUDIO_TRACE_BATCH = 2
PARITY_AUDIO_BATCHES = (1, 3, 5)
# Longer than any model's positions once tokenised: truncated to max_length, so the longest shape is exercised.
PARITY_LONG_TEXT = " ".join(["a dog barks twice while rain falls on a tin roof"] * 60)


def _read_config(source: Path) -> dict:
    path = source / "config.json"
    if not path.is_file():
        raise ExportError(f"{source} is not a Hugging Face checkpoint (no config.json)")
    config = json.loads(path.read_text())
    if config.get("model_type") != "clap":
        raise ExportError(
            f"{source} holds a {config.get('model_type')!r} model; export_clap handles model_type 'clap' (ClapModel)"
        )
    return config


# --- preprocessing -------------------------------------------------------------------------------------------------


def _audio_preprocessing(source: Path, fusion: bool) -> tuple[AudioPreprocessing, str | None]:
    """The bundle's audio preprocessing from ``preprocessor_config.json``, with the truncation mode the model needs;
    and a note when that overrides the file."""
    from models.audio import audio_config_from_hf

    path = source / "preprocessor_config.json"
    if not path.is_file():
        raise ExportError(f"{source} has no preprocessor_config.json (the ClapFeatureExtractor settings)")
    cfg = json.loads(path.read_text())
    wanted = "fusion" if fusion else "rand_trunc"
    note = None
    declared = cfg.get("truncation") or "fusion"  # ClapFeatureExtractor's default
    if declared != wanted:
        note = (
            f"preprocessor_config.json says truncation={declared!r}; the {'fused' if fusion else 'unfused'} model "
            f"takes {wanted!r} features, so the bundle uses {wanted!r}"
        )
        log.warning("%s: %s", source, note)
    try:
        return audio_config_from_hf({**cfg, "truncation": wanted}), note
    except XmodalError as exc:
        raise ExportError(f"cannot use {path}: {exc.message}") from exc


def _text_preprocessing(source: Path, tokenizer_file: Path, text_config: Any) -> TextPreprocessing:
    """Max length: RoBERTa positions start after the pad id, so ``max_position_embeddings - pad - 1`` (512 for
    CLAP), or the tokenizer's own limit when lower. Pad id: the tokenizer's, so batches look like the tokenizer's
    own padding (with the attention mask, the pad id does not change real tokens anyway)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    config_pad = int(text_config.pad_token_id if text_config.pad_token_id is not None else 1)
    max_length = min(int(text_config.max_position_embeddings) - config_pad - 1, declared_max_length(source) or 1 << 30)
    pad_id = pad_id_of(source, tok)
    if pad_id is None and tok.padding:
        pad_id = tok.padding.get("pad_id")
    if pad_id is None:
        pad_id = config_pad
    if max_length <= 2:
        raise ExportError(f"{source}: the text model has room for {max_length} tokens only")
    return TextPreprocessing(tokenizer="tokenizer.json", max_length=max_length, pad_id=int(pad_id))


# --- the torch towers ----------------------------------------------------------------------------------------------


def _text_tower(torch: Any, model: Any) -> Any:
    def forward(self, input_ids, attention_mask):  # noqa: ANN001
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        pooler = self.model.text_model.pooler  # the head get_text_features applies to <s>, here to every token
        tokens = self.model.text_projection(pooler.activation(pooler.dense(out.last_hidden_state)))
        return tower_outputs(torch, out.pooler_output, tokens, attention_mask)

    return tower_module(torch, "ClapTextTower", forward, model=model)


def _audio_tower(torch: Any, model: Any, fusion: bool) -> Any:
    def outputs(out: Any) -> tuple:
        # last_hidden_state: [B, C, F', T'] (time in order); mean over F' then project each time step.
        steps = out.last_hidden_state.mean(dim=2).transpose(1, 2)
        tokens = model.audio_projection(steps)
        mask = torch.ones(tokens.shape[:2], dtype=torch.int32, device=tokens.device)
        return tower_outputs(torch, out.pooler_output, tokens, mask)

    if fusion:

        def fused_forward(self, input_features, is_longer):  # noqa: ANN001
            return outputs(self.model.get_audio_features(input_features=input_features, is_longer=is_longer))

        return tower_module(torch, "ClapFusedAudioTower", fused_forward, model=model)

    def forward(self, input_features):  # noqa: ANN001
        return outputs(self.model.get_audio_features(input_features=input_features))

    return tower_module(torch, "ClapAudioTower", forward, model=model)


def _masked_fusion_patch_embed(torch: Any, inner: Any) -> Any:
    """``ClapAudioPatchEmbed`` (fusion on) without data-dependent shapes: the local branch and the attentional
    fusion run on every row, and ``torch.where`` keeps the fused rows where ``is_longer``. Same numbers as the
    original, which runs them on the longer rows only: every step is per row (convolutions, eval BatchNorm,
    per-sample average pooling)."""
    F = torch.nn.functional

    class MaskedFusionPatchEmbed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, hidden_states, is_longer_idx=None):  # noqa: ANN001
            p = self.inner
            batch = hidden_states.shape[0]
            # The encoder hands over torch.where(is_longer)[0]; back to a per-row flag without reading its length.
            longer = torch.zeros(batch, dtype=torch.bool, device=hidden_states.device)
            longer = longer.index_fill(0, is_longer_idx, True)
            global_states = p.proj(hidden_states[:, 0:1])
            local = hidden_states[:, 1:]
            _, channels, height, width = local.shape
            local = p.mel_conv2d(local.reshape(batch * channels, 1, height, width))
            _, features, height, width = local.shape
            local = local.view(batch, channels, features, height, width).permute(0, 2, 3, 1, 4).flatten(3)
            local = F.pad(local, (0, global_states.size(-1) - local.size(-1)), "constant", 0)
            fused = p.fusion_model(global_states, local)
            states = torch.where(longer[:, None, None, None], fused, global_states)
            if p.flatten:
                states = states.flatten(2).transpose(1, 2)
            return p.norm(states)

    return MaskedFusionPatchEmbed()


@contextlib.contextmanager
def _exportable(torch: Any, model: Any, fusion: bool) -> Iterator[None]:
    """Within the block, a fused model's patch embedding is the traceable one; the original is put back after."""
    if not fusion:
        yield
        return
    encoder = model.audio_model.audio_encoder
    original = encoder.patch_embed
    encoder.patch_embed = _masked_fusion_patch_embed(torch, original)
    try:
        yield
    finally:
        encoder.patch_embed = original


# --- parity --------------------------------------------------------------------------------------------------------


def parity_waveforms(sample_rate: int, clip_seconds: float, n: int, seed: int = 0) -> list[np.ndarray]:
    """Synthetic clips for parity: tones, a chirp, noise, clicks and near-silence, of lengths from a tenth of the
    clip to 1.6 clips (short ones get padded, long ones truncated or fused)."""
    rng = np.random.default_rng(seed)
    clip = int(round(clip_seconds * sample_rate))
    out = []
    for i in range(n):
        length = max(int(clip * (0.1, 0.55, 1.0, 1.6, 0.3, 1.25)[i % 6]), 64)
        t = np.arange(length) / sample_rate
        kind = i % 5
        if kind == 0:
            x = 0.5 * np.sin(2 * np.pi * (220 + 110 * i) * t)
        elif kind == 1:  # a linear chirp from 100 Hz to 0.45 of the sample rate
            x = 0.4 * np.sin(2 * np.pi * (100 * t + (0.45 * sample_rate - 100) * t * t / (2 * t[-1])))
        elif kind == 2:
            x = 0.3 * rng.standard_normal(length)
        elif kind == 3:
            x = np.zeros(length)
            x[:: max(length // 7, 1)] = 0.9
        else:
            x = 1e-4 * rng.standard_normal(length)
        out.append(x.astype(np.float32))
    return out


def _audio_feeds(pre: AudioPreprocessing, fusion: bool) -> list[dict[str, np.ndarray]]:
    from models.audio import AudioPreprocessor

    audio = AudioPreprocessor(pre)
    waves = parity_waveforms(pre.sample_rate, pre.clip_seconds, max(PARITY_AUDIO_BATCHES))
    feeds = []
    for size in PARITY_AUDIO_BATCHES:
        feed = audio(waves[-size:])
        if fusion:  # both ways for every clip: the fused and the plain path of each row
            feeds.append({"input_features": feed["input_features"], "is_longer": ~feed["is_longer"]})
            feeds.append(feed)
        else:
            feeds.append({"input_features": feed["input_features"]})
    return feeds


# --- export --------------------------------------------------------------------------------------------------------


def _load_model(transformers: Any, source: Path) -> Any:
    try:
        model = transformers.ClapModel.from_pretrained(str(source)).eval()
    except Exception as exc:  # OSError, ValueError, size mismatches: say which checkpoint
        raise ExportError(f"cannot load {source} as ClapModel: {exc}") from exc
    audio = model.config.audio_config
    if int(audio.patch_embed_input_channels) != 1:
        raise ExportError(f"{source}: patch_embed_input_channels={audio.patch_embed_input_channels} is not supported")
    if audio.enable_fusion and audio.fusion_type == "channel_map":
        raise ExportError(f"{source}: fusion_type 'channel_map' is not supported (transformers cannot run it either)")
    return model


def _check_audio_shapes(source: Path, pre: AudioPreprocessing, audio_config: Any) -> tuple[int, int]:
    """(channels, frames) of ``input_features``, after checking HTSAT can take them."""
    frames = int(round(pre.clip_seconds * pre.sample_rate)) // pre.hop_length + 1
    if pre.n_mels != int(audio_config.num_mel_bins):
        raise ExportError(f"{source}: the features have {pre.n_mels} mel bins, the model {audio_config.num_mel_bins}")
    freq_ratio = int(audio_config.spec_size) // int(audio_config.num_mel_bins)
    if freq_ratio < 1 or frames > int(audio_config.spec_size) * freq_ratio:
        raise ExportError(
            f"{source}: a {pre.clip_seconds:g} s clip gives {frames} frames, more than the model's spectrogram "
            f"holds ({int(audio_config.spec_size) * freq_ratio})"
        )
    return (4 if audio_config.enable_fusion else 1), frames


def _audio_example(torch: Any, channels: int, frames: int, n_mels: int, fusion: bool) -> tuple:
    """Fixed features in the log-mel range (dB), and for fused models one longer clip and one not."""
    n = AUDIO_TRACE_BATCH * channels * frames * n_mels
    features = torch.linspace(-90.0, 10.0, n).reshape(AUDIO_TRACE_BATCH, channels, frames, n_mels)
    if not fusion:
        return (features,)
    return features, torch.tensor([[True], [False]])


def _audio_export(torch: Any, model: Any, pre: AudioPreprocessing, source: Path) -> TowerExport:
    """The audio tower to export: traced with a traceable fusion branch (fused models), checked against the
    unmodified transformers model (with ``is_longer`` both ways)."""
    audio_config = model.config.audio_config
    fusion = bool(audio_config.enable_fusion)
    channels, frames = _check_audio_shapes(source, pre, audio_config)
    names = ["input_features", "is_longer"] if fusion else ["input_features"]
    batch = torch.export.Dim("batch")
    return TowerExport(
        modality="audio",
        module=_audio_tower(torch, model, fusion),
        example=_audio_example(torch, channels, frames, pre.n_mels, fusion),
        inputs=names,
        dynamic={n: {0: batch} for n in names},
        feeds=_audio_feeds(pre, fusion),
        preprocessing=pre,
        context=lambda: _exportable(torch, model, fusion),
    )


def export_clap(source: Path, models_dir: Path, name: str, version: str = "1") -> ModelManifest:
    """Export a local ``ClapModel`` checkpoint folder as a text + audio bundle ``<models_dir>/<name>``.

    The folder needs config.json (model_type ``clap``), the weights, preprocessor_config.json (ClapFeatureExtractor)
    and a tokenizer (tokenizer.json, or one transformers can turn into it). The bundle is only written (staged,
    then renamed into place) when both graphs reproduce the torch model on shapes they were not traced on.
    """
    source = Path(source)
    raw_config = _read_config(source)
    fusion = bool((raw_config.get("audio_config") or {}).get("enable_fusion", False))
    audio_pre, truncation_note = _audio_preprocessing(source, fusion)  # before torch: a bad folder fails fast
    torch, transformers = import_torch()
    model = _load_model(transformers, source)
    text_config = model.config.text_config

    def towers(tmp: Path) -> list[TowerExport]:
        write_tokenizer(source, tmp / "tokenizer.json")
        text_pre = _text_preprocessing(source, tmp / "tokenizer.json", text_config)
        text = text_tower(
            torch,
            _text_tower(torch, model),
            tmp,
            text_pre,
            TEXT_INPUTS,
            int(text_config.vocab_size),
            max_length=text_pre.max_length,  # the position embeddings bound the length
            long_text=PARITY_LONG_TEXT,
        )
        return [text, _audio_export(torch, model, audio_pre, source)]

    source_info = {
        "kind": "hf-clap",
        "class": "ClapModel",
        "path": str(source),
        "fusion": fusion,
        "text_tokens": "every position through the pooler head (dense + tanh) and text_projection",
        "audio_tokens": "HTSAT final map: time steps (frequency rows averaged) through audio_projection",
        **({"truncation_override": truncation_note} if truncation_note else {}),
    }
    return export_bundle(torch, models_dir, name, version, towers, source_info)
