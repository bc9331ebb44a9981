"""Encoder benchmark (issue 3): every tower, ONNX Runtime vs torch eager; int8 bundles; preprocessing throughput.

Usage:
    python bench/encoders.py [--quick] [--repeats N]

Everything happens in a temporary directory that is removed at the end. Checkpoints with random weights are
built there with ``save_pretrained`` (speed does not depend on the weights' values) and exported with
``models.registry.export_checkpoint``, as a user's own checkpoint would be; the MiniLM sentence encoder (real
weights) comes from ``models.registry.prepare``. Exports are not timed as results.

- CLIP tiny: ``tests.checkpoints.make_clip_checkpoint`` (hidden 32, 2 layers, 32 px images), with
  CLIP's real BPE tokenizer where ``../shared/data/clip-bpe`` is present.
- CLIP base: transformers' default ``CLIPConfig`` (ViT-B/32 image tower at 224 px, 12-layer 512-wide text tower).
- CLAP tiny: the unfused config of ``tests/checkpoints.py`` (``tiny_clap_parts``) (RoBERTa 32 x 2, HTSAT 2 + 2 blocks,
  16 mel bins, 1 s at 16 kHz).
- CLAP base: transformers' default ``ClapConfig`` (HTSAT, 4 stages 2-2-6-2, unfused; RoBERTa-base text) with the
  default ``ClapFeatureExtractor`` (48 kHz, 10 s clips, 64 mel bins; truncation ``rand_trunc`` as the unfused model
  needs). Its tokenizer is a byte-level BPE trained here on the COCO captions (no RoBERTa vocabulary can be
  downloaded): captions come out about as wide as with CLIP's real BPE (19 tokens per padded batch of 32).

1. Towers: torch eager = the exporters' own wrapper modules (``export.clip._text_tower`` / ``_image_tower``,
   ``export.clap._text_tower`` / ``_audio_tower``, ``export.sentence_transformers._text_wrapper``) around the loaded
   transformers model,
   under ``torch.inference_mode()``; ONNX Runtime = the ``Encoder``'s session for that tower, ``session.run`` only,
   all three outputs (the same work as the torch module). Both get the same preprocessed arrays (real COCO captions
   and photos, real spoken digits where ``../shared/data`` has them) and the same thread count (all usable cores).
   Batch 32 and batch 1; the runtimes take turns in blocks of back-to-back calls (``bench.foundation._alternating``:
   ORT's spinning threads slow a torch call started right after an ORT call).
2. int8: ``models.quantize.derive(models_dir, bundle, "int8")`` for every base model (the tiny ones with --quick);
   its session takes part in the same alternation, so the speed-up over fp32 ONNX is measured side by side. Min
   cosine to fp32: the derived manifest's (derive's own sample inputs) and on the benchmark's inputs.
3. Preprocessing, single thread: decode + preprocess of the real COCO photos through the CLIP base bundle's
   ``ImagePreprocessor`` and of 500 FSDD recordings (8 kHz WAV) through the CLAP base bundle's ``AudioPreprocessor``
   (decode, resample to 48 kHz, 10 s log-mel features), compared with the tower's ONNX encode rate at batch 32.

Every timed section reports how much CPU other processes took meanwhile. Prints markdown tables (progress goes
to stderr); paste them into docs/benchmarks.md. Full run: about 8-10 minutes on 2 cores (mostly exporting the base
CLAP model, ~55 s, and timing its audio tower); --quick: tiny configs only, about a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without the editable install
    sys.path.insert(0, str(REPO))

from bench.foundation import (  # noqa: E402
    SWITCH_PAUSE_S,
    OtherLoad,
    _alternating,
    _cpu_model,
    _git_rev,
    _version,
    log,
    say,
    table,
    verdict,
)
from models.bundle import load_manifest  # noqa: E402
from models.encoder import Encoder  # noqa: E402
from models.export import OUTPUTS  # noqa: E402

DATA = REPO.parent / "shared" / "data"
COCO = DATA / "coco-mini"
FSDD = DATA / "fsdd" / "recordings"
ORT_TARGET = 1.5  # ONNX Runtime items/s / torch eager items/s at batch 32
AUDIO_FILES = 500
BATCH = 32
# Per (tower, size): how many batches of 32 and how many single items one timed pass runs. A base audio or image
# batch of 32 takes seconds on 2 cores, so those get one batch per pass (its median over the repeats).
PLAN = {
    ("text", "tiny"): (4, 16),
    ("text", "base"): (4, 16),
    ("image", "tiny"): (4, 16),
    ("image", "base"): (1, 8),
    ("audio", "tiny"): (4, 16),
    ("audio", "base"): (1, 4),
}
FALLBACK_TEXTS = [
    "a photograph of a red bicycle leaning against a brick wall",
    "two dogs play in the snow",
    "a bowl of fruit on a wooden kitchen table next to a window",
    "jet",
    "a man rides a wave on a surfboard",
    "people walking down a busy city street at night",
]


# --- inputs -------------------------------------------------------------------------------------------------------
def coco_captions() -> list[str]:
    path = COCO / "captions.jsonl"
    if not path.is_file():
        return FALLBACK_TEXTS * 64
    return [c for line in path.read_text().splitlines() if line.strip() for c in json.loads(line)["captions"]]


def coco_images() -> list[Path]:
    folder = COCO / "images"
    return sorted(folder.glob("*.jpg")) if folder.is_dir() else []


def fsdd_files(n: int) -> list[Path]:
    files = sorted(FSDD.glob("*.wav")) if FSDD.is_dir() else []
    if len(files) <= n:
        return files
    rng = np.random.default_rng(5)
    return [files[i] for i in sorted(rng.choice(len(files), size=n, replace=False))]


# --- checkpoints ----------------------------------------------------------------------------------------------------
def make_clip(folder: Path, size: str) -> Path:
    import torch
    import transformers

    from tests.checkpoints import make_clip_checkpoint, write_clip_tokenizer

    folder.mkdir(parents=True)
    if size == "tiny":
        return make_clip_checkpoint(folder)
    tok = write_clip_tokenizer(folder)
    text = dict(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(0)
    transformers.CLIPModel(transformers.CLIPConfig(text_config=text)).eval().save_pretrained(str(folder))
    transformers.CLIPImageProcessor().save_pretrained(str(folder))  # 224 px: shortest edge, centre crop
    return folder


def make_clap(folder: Path, size: str, texts: list[str]) -> Path:
    import torch
    import transformers

    from tests.checkpoints import tiny_clap_parts, write_clap_tokenizer

    folder.mkdir(parents=True)
    if size == "tiny":
        config, extractor = tiny_clap_parts()  # the configs the tests use
        write_clap_tokenizer(folder, texts, vocab_size=300, max_length=64)
    else:
        config = transformers.ClapConfig()  # HTSAT unfused + RoBERTa-base, projection 512
        extractor = transformers.ClapFeatureExtractor(truncation="rand_trunc")  # 48 kHz, 10 s, 64 mels
        write_clap_tokenizer(folder, texts, vocab_size=8000, max_length=512)
    torch.manual_seed(0)
    transformers.ClapModel(config).eval().save_pretrained(str(folder))
    extractor.save_pretrained(str(folder))
    return folder


# --- one model ------------------------------------------------------------------------------------------------------
@dataclass
class ModelRun:
    label: str  # "CLIP base"
    family: str  # clip, clap, minilm
    size: str  # tiny, base
    bundle: Path
    int8: Path | None
    export_s: float
    int8_s: float = 0.0
    int8_manifest_cos: dict[str, float] = field(default_factory=dict)
    sizes_mb: dict[str, tuple[float, float]] = field(default_factory=dict)  # tower -> (fp32, int8) file MB


@dataclass
class TowerResult:
    model: str
    size: str
    tower: str
    shapes: dict[int, str]
    seconds: dict[int, dict[str, tuple[float, float]]]  # batch -> runner -> (median, best) per pass
    items: dict[int, int]
    load: float
    max_diff: float
    int8_cos: float | None
    n_items: int


def torch_modules(run: ModelRun, checkpoint: Path | None) -> tuple[Any, dict[str, Any]]:
    """(the transformers model, {tower: the exporter's own wrapper module})."""
    import torch
    import transformers

    if run.family == "minilm":
        from models.export.sentence_transformers import _read_st_config, _text_wrapper
        from models.registry import _minilm_source

        source = _minilm_source()
        pooling, _normalize, _max_len = _read_st_config(source)
        model = transformers.AutoModel.from_pretrained(str(source)).eval()
        return model, {"text": _text_wrapper(torch, model, pooling)}
    if run.family == "clip":
        from models.export.clip import _image_tower, _text_tower

        model = transformers.CLIPModel.from_pretrained(str(checkpoint)).eval()
        pad_id = load_manifest(run.bundle).towers["text"].preprocessing.pad_id
        return model, {"text": _text_tower(torch, model, "clip", pad_id), "image": _image_tower(torch, model, "clip")}
    from models.export.clap import _audio_tower, _text_tower

    model = transformers.ClapModel.from_pretrained(str(checkpoint)).eval()
    return model, {"text": _text_tower(torch, model), "audio": _audio_tower(torch, model, False)}


def tower_setups(encoder: Encoder, tower: str, size: str, captions: list[str]) -> dict[int, list[dict]]:
    """{batch size: [feeds]}, the tower's preprocessed inputs: real captions, photos, spoken digits when present."""
    n_batches, n_single = PLAN[(tower, size)]
    need = n_batches * BATCH + n_single
    pre = encoder.preprocessor(tower)
    rng = np.random.default_rng(3)
    if tower == "text":
        items: list[Any] = [captions[i] for i in rng.choice(len(captions), size=need, replace=len(captions) < need)]
    elif tower == "image":
        paths = coco_images()
        if paths:
            items = [pre.decode(paths[i % len(paths)]) for i in range(need)]
        else:
            from PIL import Image

            items = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(need)]
    else:
        paths = fsdd_files(need)
        if paths:
            items = [pre.decode(p) for p in paths]
        else:
            from models.export.clap import parity_waveforms

            items = parity_waveforms(pre.config.sample_rate, pre.config.clip_seconds, need)
    names = encoder.manifest.towers[tower].inputs

    def feed(chunk: list[Any]) -> dict[str, np.ndarray]:
        arrays = pre(chunk)
        return {n: arrays[n] for n in names}

    singles = items[n_batches * BATCH :]
    return {
        BATCH: [feed(items[i * BATCH : (i + 1) * BATCH]) for i in range(n_batches)],
        1: [feed([x]) for x in singles],
    }


def _shape(batches: list[dict]) -> str:
    first = next(iter(batches[0].values()))
    if first.ndim == 2:  # tokens: the mean padded width
        return f"{first.shape[0]} x {np.mean([next(iter(b.values())).shape[1] for b in batches]):.1f} tokens"
    return " x ".join(str(d) for d in first.shape)


def _unit_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def bench_model(run: ModelRun, checkpoint: Path | None, captions: list[str], threads: int, repeats: int) -> list:
    import torch

    torch.set_num_threads(threads)
    model, modules = torch_modules(run, checkpoint)
    fp32 = Encoder(run.bundle, device="cpu", threads=threads)
    int8 = Encoder(run.int8, device="cpu", threads=threads) if run.int8 else None
    results = []
    for tower, module in modules.items():
        setups = tower_setups(fp32, tower, run.size, captions)
        names = fp32.manifest.towers[tower].inputs

        def run_torch(feed: dict, module: Any = module, names: list[str] = names) -> Any:
            with torch.inference_mode():
                return module(*(torch.from_numpy(feed[n]) for n in names))

        def ort(session: Any) -> Callable[[dict], Any]:
            return lambda feed: session.run(OUTPUTS, feed)  # all outputs: the same work as the torch module

        runners = {"torch eager": run_torch, "onnxruntime": ort(fp32._sessions[tower])}
        if int8:
            runners["onnxruntime int8"] = ort(int8._sessions[tower])
        first = setups[BATCH][0]
        max_diff = float(np.abs(run_torch(first)[0].numpy() - fp32._sessions[tower].run(OUTPUTS, first)[0]).max())
        int8_cos = None
        if int8:
            cos = [
                _unit_cos(
                    fp32._sessions[tower].run(["embedding"], f)[0], int8._sessions[tower].run(["embedding"], f)[0]
                )
                for batches in setups.values()
                for f in batches
            ]
            int8_cos = float(np.concatenate(cos).min())
        log(f"{run.label} {tower}: timing {', '.join(runners)} ({repeats} repeats)")
        with OtherLoad() as load:
            seconds = {bs: _alternating(runners, batches, repeats) for bs, batches in setups.items()}
        n_items = sum(next(iter(f.values())).shape[0] for b in setups.values() for f in b)
        results.append(
            TowerResult(
                model=run.label,
                size=run.size,
                tower=tower,
                shapes={bs: _shape(b) for bs, b in setups.items()},
                seconds=seconds,
                items={bs: len(b) * bs for bs, b in setups.items()},
                load=load.share,
                max_diff=max_diff,
                int8_cos=int8_cos,
                n_items=n_items,
            )
        )
    del model, modules, fp32, int8
    gc.collect()
    return results


def _rate(r: TowerResult, bs: int, runner: str, best: bool = False) -> float:
    return r.items[bs] / r.seconds[bs][runner][1 if best else 0]


# --- preparation ----------------------------------------------------------------------------------------------------
def prepare_models(work: Path, quick: bool, captions: list[str]) -> list[tuple[ModelRun, Path | None]]:
    from models.quantize import derive
    from models.registry import export_checkpoint, prepare

    models_dir = work / "models"
    specs = [("CLIP", "clip", "tiny"), ("CLAP", "clap", "tiny")]
    if not quick:
        specs = [
            ("MiniLM-L6 (real weights)", "minilm", "base"),
            *specs,
            ("CLIP", "clip", "base"),
            ("CLAP", "clap", "base"),
        ]
    int8_size = "tiny" if quick else "base"
    runs = []
    for name, family, size in specs:
        label = name if family == "minilm" else f"{name} {size}"
        bundle_name = f"{family}-{size}"
        checkpoint = None
        t0 = time.perf_counter()
        if family == "minilm":
            manifest, _built = prepare(models_dir)
            bundle_name = manifest.name
        else:
            log(f"{label}: building a random-weight checkpoint")
            checkpoint = work / "checkpoints" / bundle_name
            if family == "clip":
                make_clip(checkpoint, size)
            else:
                make_clap(checkpoint, size, captions)
            log(f"{label}: exporting with export_checkpoint")
            export_checkpoint(checkpoint, models_dir, bundle_name)
        export_s = time.perf_counter() - t0
        log(f"{label}: exported in {export_s:.0f} s")
        run = ModelRun(
            label=label, family=family, size=size, bundle=models_dir / bundle_name, int8=None, export_s=export_s
        )
        if size == int8_size:
            t0 = time.perf_counter()
            derived = derive(models_dir, bundle_name, "int8")
            run.int8_s = time.perf_counter() - t0
            run.int8 = models_dir / derived.name
            run.int8_manifest_cos = {t: p["min_cosine_vs_fp32"] for t, p in derived.parity["int8"].items()}
            for tower, spec in derived.towers.items():
                run.sizes_mb[tower] = tuple(  # type: ignore[assignment]
                    (d / spec.onnx).stat().st_size / 1e6 for d in (run.bundle, run.int8)
                )
            log(f"{label}: int8 derived in {run.int8_s:.0f} s")
        runs.append((run, checkpoint))
    return runs


# --- 3. preprocessing -----------------------------------------------------------------------------------------------
@dataclass
class PreResult:
    modality: str
    bundle: str
    files: int
    decode: tuple[float, float]  # (wall s, cpu s) for all files
    features: tuple[float, float]
    load: float
    note: str


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 goes to stderr within the block: libraries (the tokenizers trainer, ONNX Runtime's
    quantiser) print progress there, and stdout is for the report."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def bench_preprocessing(bundle: Path, modality: str, files: list[Path], passes: int) -> PreResult:
    """decode every file, then ``pre(batch)`` on batches of 32; the best of ``passes`` (files stay in the page
    cache after the first, untimed, pass)."""
    enc = Encoder(bundle, device="cpu", threads=1)
    pre = enc.preprocessor(modality)
    decoded = [pre.decode(p) for p in files]  # warm: page cache, lazy imports, soxr and FFT plans

    def decode_all() -> list:
        return [pre.decode(p) for p in files]

    def features_all() -> list:
        return [pre(decoded[i : i + BATCH]) for i in range(0, len(decoded), BATCH)]

    best_d = best_f = (float("inf"), 0.0)
    with OtherLoad() as load:
        for _ in range(passes):
            _, wall, cpu = _timed(decode_all)
            best_d = min(best_d, (wall, cpu))
            _, wall, cpu = _timed(features_all)
            best_f = min(best_f, (wall, cpu))
    if modality == "image":
        sizes = [im.size for im in decoded]
        note = f"{np.mean([w * h for w, h in sizes]) / 1e6:.2f} Mpixel on average, to {pre.output_size} px"
    else:
        seconds = [len(x) / pre.config.sample_rate for x in decoded]
        note = (
            f"{np.mean(seconds):.2f} s on average, resampled to {pre.config.sample_rate} Hz, "
            f"padded to {pre.config.clip_seconds:g} s clips ({pre.frames} frames x {pre.config.n_mels} mels)"
        )
    return PreResult(modality, bundle.name, len(files), best_d, best_f, load.share, note)


# --- output ---------------------------------------------------------------------------------------------------------
def header(argv: list[str], threads: int) -> None:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load1, load5, load15 = os.getloadavg()
    say("# xmodal encoder benchmark (issue 3)")
    say()
    say(f"- command: `python {shlex.join(argv)}` (interpreter {sys.executable})")
    say(f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}")
    say(f"- machine: {platform.platform()}, {_cpu_model()}, os.cpu_count()={os.cpu_count()}, usable CPUs={affinity}")
    say(
        f"- load average at start: {load1:.2f} {load5:.2f} {load15:.2f} (1, 5, 15 min; trailing, so it counts what ran "
        "before: each section's `other CPU` is what ran meanwhile)"
    )
    say(
        f"- python {platform.python_version()}; onnxruntime {_version('onnxruntime')}, torch {_version('torch')}, "
        f"transformers {_version('transformers')}, onnx {_version('onnx')}, onnxscript {_version('onnxscript')}, "
        f"numpy {_version('numpy')}, Pillow {_version('PIL')}, soxr {_version('soxr')}"
    )
    say(f"- threads: torch.set_num_threads({threads}), ONNX Runtime intra_op_num_threads={threads}")
    say(f"- xmodal commit: {_git_rev()}")
    say()


def report_towers(results: list[TowerResult], runs: list[ModelRun], repeats: int) -> None:
    say("## 1. Towers: ONNX Runtime vs torch eager")
    say()
    exports = ", ".join(f"{r.label} {r.export_s:.0f} s" for r in runs)
    say(
        "Same preprocessed arrays for both runtimes: COCO captions (random sample, each batch padded to its longest), "
        "COCO photos through the bundle's ImagePreprocessor, FSDD spoken digits through its AudioPreprocessor. "
        "torch eager = the exporter's wrapper module under `torch.inference_mode()`; onnxruntime = the `Encoder`'s "
        f"session, `session.run` of all three outputs. Warm-up once per batch, then {repeats} timed repeats, runtimes "
        f"taking turns in blocks {SWITCH_PAUSE_S:g} s apart; items/s from each batch's median time (best = fastest "
        f"time). max diff = max |embedding difference| torch vs ONNX on the first batch of 32. Export times (not "
        f"part of the figures): {exports}."
    )
    say()
    say(
        "Models: random weights (built with `save_pretrained`, exported with `export_checkpoint`) except MiniLM "
        "(`models.registry.prepare`, real weights). CLIP tiny: `tests/checkpoints.py` (hidden 32, 2 layers, 32 px); "
        "CLIP base: default `CLIPConfig` (ViT-B/32 at 224 px, 12 x 512 text), CLIP's real BPE tokenizer. CLAP tiny: "
        "the unfused config of `tests/checkpoints.py` (`tiny_clap_parts`) (1 s at 16 kHz, 16 mels); CLAP base: default "
        "`ClapConfig` (HTSAT 2-2-6-2 unfused, RoBERTa-base) and `ClapFeatureExtractor` (10 s at 48 kHz, 64 mels), "
        "with a byte-level BPE trained on the COCO captions as tokenizer (300 tokens tiny, 8,000 base)."
    )
    say()
    rows = []
    for r in results:
        for bs in (BATCH, 1):
            torch_s, ort_s = _rate(r, bs, "torch eager"), _rate(r, bs, "onnxruntime")
            ratio = ort_s / torch_s
            best = _rate(r, bs, "onnxruntime", True) / _rate(r, bs, "torch eager", True)
            target = bs == BATCH
            rows.append(
                [
                    r.model,
                    r.tower,
                    bs,
                    r.shapes[bs],
                    f"{torch_s:.1f}",
                    f"{ort_s:.1f}",
                    f"{ratio:.2f}x",
                    f"{best:.2f}x",
                    f">= {ORT_TARGET:g}x" if target else "",
                    verdict(ratio, ORT_TARGET) if target else "",
                    f"{r.max_diff:.1e}" if target else "",
                    f"{r.load:.0f}%" if target else "",
                ]
            )
    say(
        table(
            [
                "model",
                "tower",
                "batch",
                "input",
                "torch items/s",
                "ONNX items/s",
                "ONNX / torch",
                "best / best",
                "target",
                "result",
                "max diff",
                "other CPU",
            ],
            rows,
        )
    )
    say()


def report_int8(results: list[TowerResult], runs: list[ModelRun]) -> None:
    by_label = {r.label: r for r in runs}
    rows = []
    for r in results:
        run = by_label[r.model]
        if r.int8_cos is None:
            continue
        fp32_s, int8_s = _rate(r, BATCH, "onnxruntime"), _rate(r, BATCH, "onnxruntime int8")
        fp32_1, int8_1 = _rate(r, 1, "onnxruntime"), _rate(r, 1, "onnxruntime int8")
        mb_fp32, mb_int8 = run.sizes_mb[r.tower]
        rows.append(
            [
                r.model,
                r.tower,
                f"{fp32_s:.1f}",
                f"{int8_s:.1f}",
                f"{int8_s / fp32_s:.2f}x",
                f"{int8_s / _rate(r, BATCH, 'torch eager'):.2f}x",
                f"{int8_1 / fp32_1:.2f}x",
                f"{run.int8_manifest_cos[r.tower]:.4f}",
                f"{r.int8_cos:.4f}",
                r.n_items,
                f"{mb_fp32:.1f} -> {mb_int8:.1f}",
            ]
        )
    say('## 2. int8 bundles (`models.quantize.derive(..., "int8")`)')
    say()
    derives = ", ".join(f"{r.label} {r.int8_s:.0f} s" for r in runs if r.int8)
    say(
        "Dynamic int8 quantisation of MatMul/Gemm weights (per channel), activations quantised at run time. Timed in "
        "the same alternation as section 1 (same inputs, same threads). min cos (manifest) = derive's own parity "
        "check (its few sample inputs); min cos (fresh) = the lowest row cosine between the fp32 and int8 embeddings "
        f"of every benchmark input of that tower (n fresh). Derive times: {derives}."
    )
    say()
    say(
        table(
            [
                "model",
                "tower",
                "fp32 ONNX items/s (b32)",
                "int8 items/s (b32)",
                "int8 / fp32 (b32)",
                "int8 / torch (b32)",
                "int8 / fp32 (b1)",
                "min cos (manifest)",
                "min cos (fresh)",
                "n fresh",
                "MB fp32 -> int8",
            ],
            rows,
        )
    )
    say()


def report_preprocessing(
    pres: list[PreResult], skipped: list[str], results: list[TowerResult], size: str, threads: int
) -> None:
    say("## 3. Preprocessing (decode + preprocess, one thread) vs encoding")
    say()
    say(
        "decode = `Encoder.decode` on the file (photos: JPEG decode, EXIF orientation, RGB; audio: WAV decode, "
        "resample, clip to [-1, 1]); preprocess = the preprocessor's `__call__` on batches of 32 (photos: resize, "
        "centre crop, normalise; audio: pad, STFT, log-mel). Best of 3 passes after a warm pass; "
        "CPU / wall near 1.0 confirms one thread. encode = the tower's ONNX Runtime rate at batch 32 on all cores, "
        "from section 1. On this machine an item costs 1 / pre items/s core-seconds to preprocess and "
        f"{threads} / encode items/s core-seconds to encode; encoded one after the other (as `Encoder` does), "
        "items/s = 1 / (1 / pre + 1 / encode)."
    )
    say()
    rows = []
    for p in pres:
        family = "CLIP" if p.modality == "image" else "CLAP"
        tower = next(r for r in results if r.tower == p.modality and r.model == f"{family} {size}")
        enc32 = _rate(tower, BATCH, "onnxruntime")
        enc8 = _rate(tower, BATCH, "onnxruntime int8") if tower.int8_cos is not None else None
        total_wall = p.decode[0] + p.features[0]
        pre_rate = p.files / total_wall
        serial = 1 / (1 / pre_rate + 1 / enc32)
        share = (1 / pre_rate) / (1 / pre_rate + 1 / enc32)
        rows.append(
            [
                p.modality,
                p.bundle,
                p.files,
                f"{p.files / p.decode[0]:.0f}",
                f"{p.files / p.features[0]:.0f}",
                f"{pre_rate:.0f}",
                f"{(p.decode[1] + p.features[1]) / total_wall:.2f}",
                f"{enc32:.1f}",
                f"{enc8:.1f}" if enc8 else "",
                f"{pre_rate / enc32:.1f}x",
                f"{serial:.1f}",
                f"{100 * share:.0f}%",
                "yes" if pre_rate < enc32 else "no",
                f"{p.load:.0f}%",
            ]
        )
    say(
        table(
            [
                "modality",
                "bundle",
                "files",
                "decode items/s",
                "preprocess items/s",
                "decode + preprocess items/s",
                "CPU / wall",
                "encode items/s (fp32, b32)",
                "(int8)",
                "pre / encode",
                "serial items/s",
                "time in preprocessing",
                "bottleneck?",
                "other CPU",
            ],
            rows,
        )
    )
    say()
    for p in pres:
        say(f"- {p.modality}: {p.note}.")
    for line in skipped:
        say(f"- {line}")
    say()


# --- main -----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configs only (a smoke run, about a minute)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per runtime and batch size (default 5)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    header([sys.argv[0] if sys.argv[0].endswith(".py") else "bench/encoders.py", *argv], threads)
    started = time.perf_counter()
    captions = coco_captions()
    size = "tiny" if args.quick else "base"
    with tempfile.TemporaryDirectory(prefix="xmodal-bench-enc-") as tmp, stdout_to_stderr():
        work = Path(tmp)
        log(f"work dir {work}")
        runs = prepare_models(work, args.quick, captions)
        results: list[TowerResult] = []
        for run, checkpoint in runs:
            results += bench_model(run, checkpoint, captions, threads, args.repeats)
        pres, skipped = [], []
        bundles = {r.family: r.bundle for r, _ in runs if r.size == size}
        images = coco_images()
        if images:
            log(f"preprocessing: {len(images)} COCO photos")
            pres.append(bench_preprocessing(bundles["clip"], "image", images[: 64 if args.quick else None], 3))
        else:
            skipped.append(f"images skipped: no COCO photos in {COCO / 'images'}")
        clips = fsdd_files(64 if args.quick else AUDIO_FILES)
        if clips:
            log(f"preprocessing: {len(clips)} FSDD recordings")
            pres.append(bench_preprocessing(bundles["clap"], "audio", clips, 3))
        else:
            skipped.append(f"audio skipped: no FSDD recordings in {FSDD}")
    report_towers(results, [r for r, _ in runs], args.repeats)
    report_int8(results, [r for r, _ in runs])
    report_preprocessing(pres, skipped, results, size, threads)
    say(f"Benchmark wall time: {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
