"""Train an image or audio tower onto a frozen text tower (LiT), with FILIP's token-wise loss, and export it: the
trainer behind ``xmodal models train --pairs`` and the xmodal-mini recipe (``models.mini.recipe``).

The text tower's pooled vectors and contextual token vectors are the targets: they are computed once with the ONNX
text tower (``encode_captions``), never trained. The loss is InfoNCE in both directions on the pooled vectors plus
InfoNCE in both directions on FILIP similarities (media→text: mean over the media tokens of the max over the
caption's real tokens; text→media: mean over the caption's real tokens of the max over the media tokens). Samples
that share a ``group`` (the same caption meaning) are all positives of one another, so templated captions that
repeat inside a batch are not pushed apart. Inputs are made by the runtime's own numpy preprocessors, so the graph
sees in training exactly what it sees when serving. Needs torch (the ``export`` extra).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.bundle import AudioPreprocessing, ImagePreprocessing, ModelManifest, Tower, copy_tower, load_manifest
from models.encoder import Encoder
from models.errors import InvalidInput
from models.export.base import TowerExport, export_towers, finish_bundle
from models.files import jsonl_rows, sha256_file, staging_dir
from models.mini.towers import AudioTower, ImageTower

log = logging.getLogger(__name__)
Progress = Callable[[int, int, float], None]  # (step, total steps, running loss)

IMAGE_PREPROCESSING = ImagePreprocessing(
    resize_mode="exact", size=64, resample="bilinear", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]
)
AUDIO_PREPROCESSING = AudioPreprocessing(
    sample_rate=16_000,
    clip_seconds=2.0,
    n_fft=512,
    hop_length=320,
    n_mels=64,
    f_min=0.0,
    f_max=8000.0,
    padding="repeatpad",
    truncation="rand_trunc",
)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of the steps
    filip_weight: float = 1.0
    width: int = 128
    layers: int = 2
    heads: int = 4
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = one per core


@dataclass
class TextTargets:
    """Frozen text-tower outputs for every distinct caption: pooled [C, D], tokens [C, L, D] padded, mask [C, L]."""

    captions: list[str]
    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor

    def index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.captions)}


def encode_captions(text_encoder: Encoder, captions: Sequence[str], batch_size: int = 64) -> TextTargets:
    """Distinct captions through the frozen ONNX text tower, once (far faster than MiniLM in the training loop)."""
    unique = sorted(set(captions))
    out = text_encoder.encode_text_tokens(unique, batch_size=batch_size)
    longest = max(len(t) for t in out.tokens)
    tokens = np.zeros((len(unique), longest, text_encoder.dim), dtype=np.float32)
    mask = np.zeros((len(unique), longest), dtype=bool)
    for i, t in enumerate(out.tokens):
        tokens[i, : len(t)], mask[i, : len(t)] = t, True
    return TextTargets(unique, torch.from_numpy(out.embedding), torch.from_numpy(tokens), torch.from_numpy(mask))


# --- inputs ---------------------------------------------------------------------------------------------------------
def media_inputs(modality: str, media: Sequence[Any], config: ImagePreprocessing | AudioPreprocessing) -> np.ndarray:
    """Decoded images (PIL) or waveforms → the tower's input array, by the runtime's own preprocessor."""
    return _preprocessor(modality, config)(list(media))[tower_input(modality)]


def build_tower(modality: str, config: TrainConfig, dim: int, audio: AudioPreprocessing | None = None) -> Any:
    if modality == "image":
        return ImageTower(dim=dim, width=config.width, layers=config.layers, heads=config.heads)
    if modality == "audio":
        audio = audio or AUDIO_PREPROCESSING
        frames = audio.clip_samples // audio.hop_length + 1
        return AudioTower(frames, audio.n_mels, dim=dim, width=config.width, layers=config.layers, heads=config.heads)
    raise InvalidInput(f"a tower is trained for image or audio, not {modality!r}")


# --- losses ---------------------------------------------------------------------------------------------------------
def filip_similarities(
    media_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(media→text, text→media) FILIP similarities, both [B_media, B_text]. Media tokens are all real."""
    sim = torch.einsum("ipd,jld->ijpl", media_tokens, text_tokens)  # [Bm, Bt, P, L]
    m = text_mask[None, :, None, :]
    m2t = sim.masked_fill(~m, float("-inf")).amax(-1).mean(-1)
    t2m = (sim.amax(2) * text_mask[None]).sum(-1) / text_mask.sum(-1)[None].clamp(min=1)
    return m2t, t2m


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def contrastive(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """InfoNCE in both directions on [B_media, B_text] logits with a (multi-positive) target distribution."""
    return 0.5 * (_soft_ce(logits, target) + _soft_ce(logits.T, target.T))


@dataclass
class TrainResult:
    module: Any
    history: list[dict] = field(default_factory=list)  # one row per epoch: loss, dense and filip parts
    seconds: float = 0.0
    steps: int = 0


def train_tower(
    modality: str,
    inputs: np.ndarray,
    caption_ids: Sequence[Sequence[int]],
    groups: np.ndarray,
    text: TextTargets,
    config: TrainConfig,
    audio: AudioPreprocessing | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train a fresh tower on ``inputs`` [N, ...] whose sample i is described by any of ``caption_ids[i]`` (rows of
    ``text``; one is drawn per step) and belongs to ``groups[i]``."""
    if len(inputs) < 2:
        raise InvalidInput("training needs at least two pairs")
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    rng = np.random.default_rng(config.seed)
    module = build_tower(modality, config, int(text.pooled.shape[1]), audio)
    if modality == "audio":  # standardise the dB features inside the graph, with training-set constants
        module.mean.fill_(float(inputs.mean()))
        module.std.fill_(float(inputs.std()) + 1e-6)
    scales = torch.nn.Parameter(torch.tensor([math.log(1 / 0.07), math.log(1 / 0.07)]))
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2] + [scales]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    batch = min(config.batch_size, len(inputs))
    per_epoch = max(1, len(inputs) // batch)
    total = per_epoch * config.epochs
    warm = max(1, int(config.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )
    x_all = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    groups_t = torch.from_numpy(np.asarray(groups, dtype=np.int64))
    result = TrainResult(module)
    started, step = time.perf_counter(), 0
    module.train()
    for epoch in range(config.epochs):
        order = rng.permutation(len(inputs))
        sums = np.zeros(3)
        for b in range(per_epoch):
            idx = order[b * batch : (b + 1) * batch]
            cap = torch.from_numpy(np.array([caption_ids[i][rng.integers(len(caption_ids[i]))] for i in idx]))
            t_pooled, t_mask = text.pooled[cap], text.mask[cap]
            width = int(t_mask.sum(1).max())
            t_tokens, t_mask = text.tokens[cap, :width], t_mask[:, :width]
            g = groups_t[idx]
            target = (g[:, None] == g[None, :]).float()
            target = target / target.sum(1, keepdim=True)
            emb, tokens, _ = module(x_all[idx])
            s = scales.clamp(max=math.log(100.0)).exp()
            dense = contrastive(s[0] * emb @ t_pooled.T, target)
            m2t, t2m = filip_similarities(tokens, t_tokens, t_mask)
            filip = 0.5 * (contrastive(s[1] * m2t, target) + contrastive(s[1] * t2m, target))
            loss = dense + config.filip_weight * filip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            sums += (loss.item(), dense.item(), filip.item())
            if progress:
                progress(step, total, float(sums[0] / (b + 1)))
        mean = sums / per_epoch
        result.history.append(
            {
                "epoch": epoch + 1,
                **{k: round(float(v), 4) for k, v in zip(("loss", "dense", "filip"), mean, strict=True)},
            }
        )
        log.info("%s tower epoch %d/%d: %s", modality, epoch + 1, config.epochs, result.history[-1])
    module.eval()
    result.seconds, result.steps = round(time.perf_counter() - started, 1), step
    return result


@torch.inference_mode()
def embed(module: Any, inputs: np.ndarray, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The trained torch tower on ``inputs``: (embedding [N, D], tokens [N, T, D]), float32."""
    module.eval()
    embs, toks = [], []
    for start in range(0, len(inputs), batch_size):
        e, t, _ = module(torch.from_numpy(np.ascontiguousarray(inputs[start : start + batch_size])))
        embs.append(e.numpy())
        toks.append(t.numpy())
    return np.concatenate(embs), np.concatenate(toks)


# --- evaluation -----------------------------------------------------------------------------------------------------
def late_matrix(queries: Sequence[np.ndarray], items: Sequence[np.ndarray]) -> np.ndarray:
    """[Nq, Ni] FILIP scores: for each query's tokens, the mean over them of the max over each item's tokens."""
    vectors = np.concatenate(items).astype(np.float32)
    lengths = np.array([len(t) for t in items])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    out = np.empty((len(queries), len(items)), dtype=np.float32)
    for qi, q in enumerate(queries):
        sims = q.astype(np.float32) @ vectors.T  # [Lq, T]
        out[qi] = np.maximum.reduceat(sims, starts, axis=1).mean(0)
    return out


def recall_at(scores: np.ndarray, query_groups: np.ndarray, item_groups: np.ndarray, ks=(1, 5, 10)) -> dict:
    """Recall@k: the share of queries with an item of their own group among the top k."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, : max(ks)]
    hit = item_groups[top] == query_groups[:, None]
    return {f"R@{k}": round(float(hit[:, :k].any(1).mean()), 4) for k in ks}


def retrieval_metrics(
    media_emb: np.ndarray,
    media_tokens: Sequence[np.ndarray],
    text_emb: np.ndarray,
    text_tokens: Sequence[np.ndarray],
    groups: np.ndarray,
    modality: str,
) -> dict:
    """text→media and media→text recall@1/5/10, dense and late, for pairs i (media i, caption i), ``groups`` marking
    which pairs mean the same thing. Chance is about 1/number of distinct groups."""
    dense = text_emb @ media_emb.T  # [texts, media]
    late_t2m = late_matrix(text_tokens, media_tokens)
    late_m2t = late_matrix(media_tokens, text_tokens)
    out = {
        f"text->{modality}": {"dense": recall_at(dense, groups, groups), "late": recall_at(late_t2m, groups, groups)},
        f"{modality}->text": {"dense": recall_at(dense.T, groups, groups), "late": recall_at(late_m2t, groups, groups)},
    }
    top10 = 10 * np.bincount(np.unique(groups, return_inverse=True)[1]).mean() / len(groups)
    out["items"], out["groups"], out["chance_R@10"] = len(groups), int(len(np.unique(groups))), round(float(top10), 4)
    return out


def group_ids(keys: Sequence[str]) -> np.ndarray:
    return np.unique(np.asarray(keys), return_inverse=True)[1].astype(np.int64)


# --- export ---------------------------------------------------------------------------------------------------------
def export_tower(
    module: Any, modality: str, folder: Path, inputs: np.ndarray, config: ImagePreprocessing | AudioPreprocessing
) -> tuple[Tower, dict]:
    """Dynamo-export the tower to ``<folder>/<modality>.onnx`` with a dynamic batch, then check ONNX vs torch on
    batch sizes other than the trace's (5, 1, 3 against 2): (manifest entry, parity). Raises ParityError."""
    module.eval()
    name = tower_input(modality)
    spec = TowerExport(
        modality=modality,
        module=module,
        example=(torch.from_numpy(np.ascontiguousarray(inputs[:2], dtype=np.float32)),),
        inputs=[name],
        dynamic={name: {0: torch.export.Dim("batch")}},
        feeds=[{name: np.ascontiguousarray(inputs[a:b], dtype=np.float32)} for a, b in ((0, 5), (5, 6), (6, 9))],
        preprocessing=config,
    )
    towers, parity, _ = export_towers(torch, folder, [spec])
    return towers[modality], parity[modality]


def tower_input(modality: str) -> str:
    """The one input of a trained tower: what the runtime's preprocessor of that modality produces."""
    return "pixel_values" if modality == "image" else "input_features"


def write_bundle(
    models_dir: Path,
    name: str,
    text_bundle: Path,
    media: dict[str, tuple[Path, Tower]],
    source: dict,
    parity: dict,
    version: str = "1",
) -> ModelManifest:
    """A bundle of ``text_bundle``'s text tower and the given media towers (ONNX file, manifest entry), fingerprinted
    and moved into ``<models_dir>/<name>`` atomically."""
    base = load_manifest(text_bundle)
    text = base.towers.get("text")
    if text is None or not text.emits_tokens:
        raise InvalidInput(f"{text_bundle.name} has no text tower with token vectors to train against")
    with staging_dir(models_dir, name) as tmp:
        copy_tower(text_bundle, text, tmp)
        towers = {"text": text}
        for modality, (onnx_path, tower) in media.items():
            shutil.copyfile(onnx_path, tmp / tower.onnx)
            towers[modality] = tower
        return finish_bundle(
            tmp,
            models_dir,
            name=name,
            version=version,
            dim=base.dim,
            towers=towers,
            source={**source, "text_tower_from": base.name, "text_fingerprint": base.fingerprint},
            parity={"text": base.parity.get("text", {}), **parity},
        )


# --- a user's own pairs ---------------------------------------------------------------------------------------------
def read_pairs(path: Path, modality: str) -> list[tuple[str, Path]]:
    """JSONL lines ``{"text": ..., "<modality>": path relative to the file}`` → (caption, absolute path)."""
    pairs = []
    for n, row in jsonl_rows(path, "pairs file"):
        text, media = (row.get("text"), row.get(modality)) if isinstance(row, dict) else (None, None)
        if not isinstance(text, str) or not text.strip() or not isinstance(media, str):
            raise InvalidInput(f'{path}:{n}: a pair is {{"text": "...", "{modality}": "relative/path"}}')
        pairs.append((text.strip(), (path.parent / media).resolve()))
    if len(pairs) < 2:
        raise InvalidInput(f"{path} has {len(pairs)} pair(s); training needs at least two")
    return pairs


def train_from_pairs(
    pairs_path: Path,
    modality: str,
    models_dir: Path,
    name: str,
    base_model: str,
    config: TrainConfig,
    progress: Progress | None = None,
) -> tuple[ModelManifest, TrainResult]:
    """Train a ``modality`` tower on a user's pairs against ``base_model``'s frozen text tower, and write bundle
    ``name`` (that text tower + the new one). Captions that are the same text count as positives of each other."""
    if modality not in ("image", "audio"):
        raise InvalidInput(f"--modality must be image or audio, not {modality!r}")
    pairs = read_pairs(pairs_path, modality)
    pre_config = IMAGE_PREPROCESSING if modality == "image" else AUDIO_PREPROCESSING
    text_encoder = Encoder(models_dir / base_model, device="cpu")
    if "text" not in text_encoder.manifest.towers:
        raise InvalidInput(f"base model {base_model} has no text tower")
    pre = _preprocessor(modality, pre_config)
    decoded = [pre.decode(p) for _, p in pairs]
    inputs = media_inputs(modality, decoded, pre_config)
    text = encode_captions(text_encoder, [t for t, _ in pairs])
    index = text.index()
    caption_ids = [[index[t]] for t, _ in pairs]
    result = train_tower(
        modality, inputs, caption_ids, group_ids([t for t, _ in pairs]), text, config, progress=progress
    )
    work = models_dir / f".{name}.train"
    work.mkdir(parents=True, exist_ok=True)
    try:
        tower, parity = export_tower(result.module, modality, work, inputs, pre_config)
        manifest = write_bundle(
            models_dir,
            name,
            models_dir / base_model,
            {modality: (work / tower.onnx, tower)},
            source={
                "kind": "xmodal-train",
                "pairs": str(pairs_path),
                "pairs_sha256": sha256_file(pairs_path),
                "config": asdict(config),
                "history": result.history,
            },
            parity={modality: parity},
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest, result


def _preprocessor(modality: str, config: ImagePreprocessing | AudioPreprocessing) -> Any:
    if modality == "image":
        from models.image import ImagePreprocessor

        return ImagePreprocessor(config)  # type: ignore[arg-type]
    from models.audio import AudioPreprocessor

    return AudioPreprocessor(config)  # type: ignore[arg-type]
