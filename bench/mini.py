"""xmodal-mini retrieval benchmark (issue 4): recall@1/5/10 on held-out compositions, dense and late interaction side
by side, through the shipped ONNX bundle; and, with ``--fsdd``, an audio tower trained on real spoken digits.

Usage:
    python bench/mini.py [--n 600] [--seed 1] [--fsdd] [--fsdd-epochs 8]

1. Held-out compositions: ``models.mini.data`` scenes and sounds of the ``heldout`` split (colour-shape pairs and
   event orders that never appear in training), seed 1 (the recipe evaluated seed 0). Pictures go through PNG and
   sounds through FLAC bytes and the bundle's own decoders and ONNX towers (``models.encoder.Encoder``), as a
   service query would. Each sample has one caption (its templates in turn). A query's answer counts as correct
   when it shows or sounds like the same composition (same ``key``; paraphrases share one). Dense: cosine of the
   pooled vectors. Late: ``indexer.late.maxsim.exact_scores`` (mean over the query's tokens of the max over the item's),
   all items scored exactly.
2. ``--fsdd``: an audio tower trained with ``models.training.trainer.train_tower`` on the spoken digits in
   ``../shared/data/fsdd/recordings`` of five speakers (captions "the digit seven", "someone says seven", "a spoken
   seven"), against the same frozen MiniLM text tower, evaluated on the sixth speaker (``--holdout``, default
   yweweler), through the exported ONNX graph. These weights are not kept. Skipped when the folder is absent.

Prints markdown tables (progress on stderr). About 1 minute for part 1 on 2 cores, about 5 minutes for part 2.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.late.maxsim import exact_scores  # noqa: E402
from models.encoder import Encoder  # noqa: E402
from models.mini import data  # noqa: E402
from models.mini.prepare import MINI_MODEL  # noqa: E402
from models.registry import prepare  # noqa: E402

FSDD = ROOT.parent / "shared" / "data" / "fsdd" / "recordings"
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
KS = (1, 5, 10)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def recall(scores: np.ndarray, q_groups: np.ndarray, i_groups: np.ndarray) -> list[float]:
    top = np.argsort(-scores, axis=1, kind="stable")[:, : max(KS)]
    hit = i_groups[top] == q_groups[:, None]
    return [float(hit[:, :k].any(1).mean()) for k in KS]


def late_matrix(queries: list[np.ndarray], items: list[np.ndarray]) -> np.ndarray:
    vectors = np.concatenate(items).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in items])]).astype(np.int64)
    return np.stack([exact_scores(q.astype(np.float32), vectors, offsets) for q in queries])


def evaluate(modality: str, media, texts, groups: np.ndarray) -> dict[str, dict[str, list[float]]]:  # noqa: ANN001
    """{direction: {dense: [R@1, R@5, R@10], late: [...]}} for media[i] paired with texts[i]."""
    dense = texts.embedding @ media.embedding.T
    return {
        f"text→{modality}": {
            "dense": recall(dense, groups, groups),
            "late": recall(late_matrix(texts.tokens, media.tokens), groups, groups),
        },
        f"{modality}→text": {
            "dense": recall(dense.T, groups, groups),
            "late": recall(late_matrix(media.tokens, texts.tokens), groups, groups),
        },
    }


def chance(groups: np.ndarray, k: int = 10) -> float:
    sizes = np.bincount(np.unique(groups, return_inverse=True)[1])
    n = len(groups)
    # A random ranking of n items finds one of the query's s same-group items in the top k with 1 - C(n-s,k)/C(n,k).
    miss = [np.prod([(n - s - j) / (n - j) for j in range(k)]) for s in sizes for _ in range(s)]
    return float(1 - np.mean(miss))


def table(title: str, rows: list[tuple[str, dict, str]]) -> str:
    out = [
        f"### {title}",
        "",
        "| task | items | groups | chance R@10 | dense R@1 / R@5 / R@10 | late R@1 / R@5 / R@10 |",
    ]
    out.append("| --- | ---: | ---: | ---: | --- | --- |")
    for name, r, extra in rows:
        d, late = (" / ".join(f"{v:.3f}" for v in r[m]) for m in ("dense", "late"))
        out.append(f"| {name} | {extra} | {d} | {late} |")
    return "\n".join(out)


def encode_heldout(enc: Encoder, n: int, seed: int) -> list[tuple[str, dict, str]]:
    rows = []
    scenes = data.make_scenes(n, seed, "heldout")
    sounds = data.make_sounds(n, seed, "heldout")
    for modality, samples in (("image", scenes), ("audio", sounds)):
        started = time.perf_counter()
        blobs = []
        for s in samples:
            buf = io.BytesIO()
            if modality == "image":
                s.render().save(buf, format="PNG")
            else:
                sf.write(buf, s.render(), data.SAMPLE_RATE, format="FLAC", subtype="PCM_16")
            blobs.append(buf.getvalue())
        media = enc.encode_media_tokens(modality, [enc.decode(modality, b) for b in blobs])
        texts = enc.encode_text_tokens([s.captions[i % len(s.captions)] for i, s in enumerate(samples)])
        groups = np.unique([s.key for s in samples], return_inverse=True)[1]
        result = evaluate(modality, media, texts, groups)
        extra = f"{len(samples)} | {len(np.unique(groups))} | {chance(groups):.3f}"
        rows += [(name, r, extra) for name, r in result.items()]
        log(f"{modality}: encoded and scored in {time.perf_counter() - started:.1f} s")
    return rows


@dataclass
class Fsdd:
    """The spoken digits, decoded, with their captions and the train (five speakers) / test (the sixth) split."""

    files: list[Path]
    digit: np.ndarray
    waves: list[np.ndarray]
    captions: list[list[str]]  # per clip, one per template
    train_idx: np.ndarray
    test_idx: np.ndarray


FSDD_TEMPLATES = ["the digit {}", "someone says {}", "a spoken {}", "a voice saying the number {}"]


def load_fsdd(holdout: str) -> Fsdd:
    from models.audio import AudioPreprocessor
    from models.training.trainer import AUDIO_PREPROCESSING

    files = sorted(FSDD.glob("*.wav"))
    pre = AudioPreprocessor(AUDIO_PREPROCESSING)
    digit = np.array([int(f.name.split("_")[0]) for f in files])
    speaker = np.array([f.name.split("_")[1] for f in files])
    captions = [[t.format(DIGITS[d]) for t in FSDD_TEMPLATES] for d in digit]
    waves = [pre.decode(f) for f in files]
    return Fsdd(files, digit, waves, captions, np.flatnonzero(speaker != holdout), np.flatnonzero(speaker == holdout))


def train_fsdd_bundle(enc: Encoder, digits: Fsdd, epochs: int, seed: int, out: Path) -> tuple[Encoder, dict]:
    """An audio tower trained on the training speakers' clips against ``enc``'s frozen text tower, exported to
    ONNX (parity-checked) as the bundle ``out/fsdd``; returns it loaded, and the training's time and loss."""
    from models.training.trainer import (
        AUDIO_PREPROCESSING,
        TrainConfig,
        encode_captions,
        export_tower,
        group_ids,
        media_inputs,
        train_tower,
        write_bundle,
    )

    inputs = media_inputs("audio", digits.waves, AUDIO_PREPROCESSING)
    text = encode_captions(enc, [c for cs in digits.captions for c in cs])
    index = text.index()
    train_idx, test_idx = digits.train_idx, digits.test_idx
    log(f"fsdd: training on {len(train_idx)} clips of 5 speakers, {epochs} epochs")
    result = train_tower(
        "audio",
        inputs[train_idx],
        [[index[c] for c in digits.captions[i]] for i in train_idx],
        group_ids([str(d) for d in digits.digit[train_idx]]),
        text,
        TrainConfig(epochs=epochs, seed=seed),
    )
    tower, parity = export_tower(result.module, "audio", out, inputs[test_idx], AUDIO_PREPROCESSING)
    write_bundle(
        out, "fsdd", enc.bundle_dir, {"audio": (out / tower.onnx, tower)}, {"kind": "bench"}, {"audio": parity}
    )
    info = {"train_seconds": result.seconds, "loss": [result.history[0]["loss"], result.history[-1]["loss"]]}
    return Encoder(out / "fsdd", device="cpu"), info


def fsdd(enc: Encoder, holdout: str, epochs: int, seed: int) -> tuple[list[tuple[str, dict, str]], dict]:
    digits = load_fsdd(holdout)
    test_idx = digits.test_idx
    with tempfile.TemporaryDirectory() as tmp:
        digits_enc, info = train_fsdd_bundle(enc, digits, epochs, seed, Path(tmp))
        media = digits_enc.encode_media_tokens("audio", [digits.waves[i] for i in test_idx])
        n = len(FSDD_TEMPLATES)
        texts = digits_enc.encode_text_tokens([digits.captions[i][j % n] for j, i in enumerate(test_idx)])
    groups = digits.digit[test_idx]
    res = evaluate("audio", media, texts, groups)
    extra = f"{len(test_idx)} | 10 | {chance(groups):.3f}"
    return [(f"{name} (speaker {holdout})", r, extra) for name, r in res.items()], info


def add_shared_arguments(parser: argparse.ArgumentParser) -> None:
    """The options bench/calibration.py shares: the FSDD training and where xmodal-mini is prepared."""
    parser.add_argument("--fsdd-epochs", type=int, default=8)
    parser.add_argument("--holdout", default="yweweler", help="the FSDD speaker kept out of training")
    parser.add_argument("--models-dir", type=Path, help="where xmodal-mini is prepared (default: a temporary folder)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=600, help="held-out samples per modality")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fsdd", action="store_true", help="also train and evaluate on the spoken digits")
    add_shared_arguments(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = args.models_dir or Path(tmp)
        manifest, _ = prepare(models_dir, MINI_MODEL)
        enc = Encoder(models_dir / MINI_MODEL, device="cpu")
        log(f"{MINI_MODEL} {manifest.fingerprint[:12]}")
        print(table(f"xmodal-mini, held-out compositions (seed {args.seed})", encode_heldout(enc, args.n, args.seed)))
        if args.fsdd:
            if not FSDD.is_dir():
                log(f"skipping --fsdd: no spoken digits at {FSDD}")
                return
            rows, info = fsdd(enc, args.holdout, args.fsdd_epochs, 0)
            print()
            print(table("Spoken digits (FSDD), audio tower trained on 5 speakers, tested on the 6th", rows))
            print(f"\ntraining: {info['train_seconds']} s, loss {info['loss'][0]:.3f} -> {info['loss'][1]:.3f}")


if __name__ == "__main__":
    main()
