"""Fit a projection from a NEW model's embedding space to an OLD model's (``xmodal models align NEW --to OLD``) and
write it as an adapter bundle (``models.adapter``).

Fit (the first, text-only step of XBT, "Towards Cross-modal Backward-compatible Representation Learning for
Vision-Language Models"): the same texts go through both models' text towers; a linear map W [D_new, D_old] is fitted
on a training split so that ``normalize(x_new @ W)`` lands on ``x_old``. Two candidates, both closed form:

- ``procrustes``: W with orthonormal rows or columns, ``U V^T`` from the SVD of ``X_new^T X_old`` (orthogonal
  Procrustes; any pair of dims, semi-orthogonal when they differ). It keeps NEW's geometry (angles between NEW vectors
  are kept up to the projection), so it generalises from few texts.
- ``lstsq``: ridge least squares, ``(X^T X + l I)^{-1} X^T Y``: more freedom, better with enough texts.

Both are measured on the held-out split; the one whose projected texts rank the others' OLD vectors most like NEW
ranks them is shipped (``ranking_overlap``; the map fitted on the training split, so the figures describe exactly
what is shipped). No MLP: it did not measurably help. On Cranfield (MiniLM -> wordllama-256,
fitted on the 1,400 documents, a one-off torch run), the 225 queries scored nDCG@10 0.308 / recall@100 0.694 through a
residual MLP (512 hidden) initialised at Procrustes and trained on cosine. A linear map trained with InfoNCE scored
0.293 / 0.677. Procrustes alone scored 0.323 / 0.739. A linear map also projects token vectors exactly as it does
pooled ones.

Pairs (``--pairs``, JSONL ``{"text": ...}`` plus ``"image"``/``"audio"`` paths relative to the file) refine the fit:
their texts join the training texts ``PAIR_WEIGHT`` times; and where both models have a pair's media tower, that tower
gets a map of its own (``adapter.<modality>.onnx``: the texts plus its NEW media → OLD media rows, ``PAIR_WEIGHT``
times), used for that tower's queries, while text queries keep the text-only map. On COCO (bench/upgrade.py, 59
held-out photos), the text map keeps caption->caption R@10 at 0.886, against 0.877 for one map fitted on everything.
Image->caption R@5 through the image map is 0.136, against 0.102 through the text map and 0.169 through one shared map.
The gap between the last two is two queries of 59. Needs onnx (the ``export`` extra) to write the graphs; no torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.adapter import (
    INPUT,
    ONNX_FILE,
    OUTPUT,
    AdapterManifest,
    ModelRef,
    adapter_dir,
    adapter_fingerprint,
    tower_onnx,
)
from models.encoder import Encoder
from models.errors import InvalidInput, MissingDependency
from models.files import atomic_write_json, jsonl_rows, replace_dir, sha256_file, staging_dir

log = logging.getLogger(__name__)

HELDOUT = 0.2
PAIR_WEIGHT = 4
DEFAULT_TEXTS = "vocabulary words of both models' tokenizers"
RIDGE = 1e-3  # times the mean squared norm of the inputs (unit vectors: ~1e-3 x N)
ENCODE_BATCH = 64


def vocabulary_words(*encoders: Encoder) -> list[str]:
    """Offline texts that cover a language broadly: the whole words (3+ ASCII letters) in the vocabularies of the
    models' own text tokenizers (WordPiece, BPE with ``Ġ``/``▁`` word starts, Unigram), lower-cased, sorted.

    Why words and not sentences: fitted on the bundled model's ~5,000 templated captions, MiniLM → wordllama reached
    recall@10 1.0 on held-out captions but 0.27 on COCO captions; fitted on ~21,000 vocabulary words, 0.97 on COCO
    captions and 0.95 on Cranfield queries (recall@1 0.74 / 0.74). A linear map needs the whole vocabulary's
    directions, which a small template grammar does not span."""
    words: set[str] = set()
    for enc in encoders:
        tower = enc.manifest.towers["text"]
        model = json.loads((enc.bundle_dir / tower.preprocessing.tokenizer).read_text())["model"]
        vocab = model["vocab"]
        pieces = [p[0] for p in vocab] if isinstance(vocab, list) else list(vocab)
        if model.get("type") == "WordPiece":  # word starts are the pieces without the "##" continuation mark
            starts = [p for p in pieces if not p.startswith("##")]
        else:  # BPE / Unigram: word starts carry "Ġ" (GPT-2 style) or "▁" (sentencepiece); CLIP's BPE ends words "</w>"
            starts = [p[1:] for p in pieces if p[:1] in ("Ġ", "▁")] + [p[:-4] for p in pieces if p.endswith("</w>")]
        words.update(w.lower() for w in starts if len(w) >= 3 and w.isascii() and w.isalpha())
    return sorted(words)


def sample(texts: list[str], limit: int | None, seed: int = 0) -> list[str]:
    """At most ``limit`` of ``texts``, drawn at random (seeded), in their order."""
    if not limit or limit >= len(texts):
        return texts
    return [texts[i] for i in sorted(np.random.default_rng(seed).permutation(len(texts))[:limit])]


def read_texts(path: Path) -> list[str]:
    """JSONL, one ``{"text": ...}``, ``{"captions": [...]}`` (a corpus of captioned items) or JSON string per line;
    blank lines skipped, duplicates dropped."""
    texts: dict[str, None] = {}
    for n, row in jsonl_rows(path, "texts file"):
        found = ([row["text"]] if "text" in row else row.get("captions")) if isinstance(row, dict) else [row]
        if not isinstance(found, list) or not all(isinstance(t, str) for t in found):
            raise InvalidInput(
                f'{path}:{n}: a line is {{"text": "..."}}, {{"captions": ["...", ...]}} or a JSON string'
            )
        texts.update((t.strip(), None) for t in found if t.strip())
    return list(texts)


def read_pairs(path: Path) -> list[dict[str, Any]]:
    """JSONL ``{"text": ..., "image"/"audio": path relative to the file}`` → rows with absolute media paths."""
    rows = []
    for n, row in jsonl_rows(path, "pairs file"):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise InvalidInput(f'{path}:{n}: a pair is {{"text": "...", "image" or "audio": "relative/path"}}')
        rows.append({k: (str((path.parent / v).resolve()) if k in ("image", "audio") else v) for k, v in row.items()})
    return rows


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def fit_procrustes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(x.T @ y, full_matrices=False)
    return (u @ vt).astype(np.float32)


def fit_lstsq(x: np.ndarray, y: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    lam = ridge * float((x * x).sum())
    return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y).astype(np.float32)


FITS = {"procrustes": fit_procrustes, "lstsq": fit_lstsq}


def project(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return normalize(x @ w).astype(np.float32)


def recall_at_k(queries: np.ndarray, items: np.ndarray, k: int = 10) -> float:
    """Query i's own item is item i: the share of queries that find it among the top k by cosine."""
    scores = queries @ items.T
    own = np.diag(scores)[:, None]
    rank = (scores > own).sum(1)  # items strictly better than the right one
    return float((rank < k).mean())


def ranking_overlap(x: np.ndarray, y: np.ndarray, w: np.ndarray, k: int = 10) -> float:
    """What an adapter is for: each text as a query, projected, ranks the other texts' OLD vectors as NEW ranks
    their NEW vectors. The mean share of NEW's top ``k`` that the projected query's top ``k`` keeps."""
    k = min(k, len(x) - 1)
    projected, native = project(x, w) @ normalize(y).T, normalize(x) @ normalize(x).T
    np.fill_diagonal(projected, -np.inf)
    np.fill_diagonal(native, -np.inf)
    a = np.argpartition(-projected, k - 1, axis=1)[:, :k]
    b = np.argpartition(-native, k - 1, axis=1)[:, :k]
    return float(np.mean([len(set(r) & set(t)) / k for r, t in zip(a.tolist(), b.tolist(), strict=True)]))


def quality(x: np.ndarray, y: np.ndarray, w: np.ndarray, k: int = 10) -> dict:
    p = project(x, w)
    sims = p @ y.T
    off = (sims.sum() - np.trace(sims)) / max(1, sims.size - len(sims))
    return {
        "heldout_cosine": round(float((p * y).sum(1).mean()), 4),
        "chance_cosine": round(float(off), 4),  # to the OLD vectors of the other texts
        "recall@1": round(recall_at_k(p, y, 1), 4),
        f"recall@{k}": round(recall_at_k(p, y, k), 4),
        f"ranking_overlap@{k}": round(ranking_overlap(x, y, w, k), 4),
    }


@dataclass
class AlignData:
    new: np.ndarray  # [N, D_new]
    old: np.ndarray  # [N, D_old]
    train: np.ndarray  # row indices
    heldout: np.ndarray
    info: dict = field(default_factory=dict)


def embed_pairs(new: Encoder, old: Encoder, texts: list[str], pairs: list[dict]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Both models' embeddings of ``texts`` (text towers), and of the pairs' texts and media (rows in that order:
    texts, pair texts, then each modality's media; ``counts`` says how many of each)."""
    xs, ys = [new.encode_text(texts, batch_size=ENCODE_BATCH)], [old.encode_text(texts, batch_size=ENCODE_BATCH)]
    counts = {"texts": len(texts)}
    if pairs:
        pair_texts = [p["text"] for p in pairs] * PAIR_WEIGHT
        xs.append(new.encode_text(pair_texts, batch_size=ENCODE_BATCH))
        ys.append(old.encode_text(pair_texts, batch_size=ENCODE_BATCH))
        counts["pair_texts"] = len(pairs)
        for modality in ("image", "audio"):
            files = [p[modality] for p in pairs if modality in p]
            if not files or modality not in new.modalities or modality not in old.modalities:
                continue
            decoded = [new.decode(modality, Path(f)) for f in files]
            xs.append(np.repeat(new.encode_media(modality, decoded), PAIR_WEIGHT, axis=0))
            ys.append(
                np.repeat(old.encode_media(modality, [old.decode(modality, Path(f)) for f in files]), PAIR_WEIGHT, 0)
            )
            counts[f"pair_{modality}"] = len(files)
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.float32), counts


def fit(data: AlignData) -> tuple[str, np.ndarray, dict]:
    """(method, W, figures of every candidate on the held-out split). The shipped W is the one whose projected
    held-out texts rank the others' OLD vectors most like NEW ranks them (``ranking_overlap``), not the closest in
    cosine: on Cranfield (MiniLM -> wordllama-256, fitted on the 1,400 documents) ridge least squares had the better
    held-out cosine (0.800 against 0.730) and Procrustes the better ranking overlap (0.593 against 0.521) and the
    better retrieval (nDCG@10 0.320 against 0.312, recall@100 0.736 against 0.695)."""
    x, y = data.new[data.train], data.old[data.train]
    hx, hy = data.new[data.heldout], data.old[data.heldout]
    candidates = {m: f(x, y) for m, f in FITS.items()}
    figures = {m: quality(hx, hy, w) for m, w in candidates.items()}
    best = max(figures, key=lambda m: (figures[m]["ranking_overlap@10"], figures[m]["heldout_cosine"]))
    return best, candidates[best], figures


SCORE_MAP_TOP = 20  # the pairs a score map is fitted on: each held-out text's top this many in either space


def fit_score_map(x: np.ndarray, y: np.ndarray, w: np.ndarray, top: int = SCORE_MAP_TOP) -> dict:
    """How a NEW query projected into OLD's space scores an OLD vector, against how the same pair scores natively
    in NEW's space: ``new ≈ slope * projected + intercept``, least squares over the held-out pairs (each text as a
    query against the others) that rank in the top ``top`` in either space, where rankings are decided. A mixed
    index maps its OLD segments' scores with it, so one item scores alike whichever model encoded it."""
    xn, proj = normalize(x), project(x, w)
    native, projected = xn @ xn.T, proj @ normalize(y).T
    np.fill_diagonal(native, -np.inf)
    np.fill_diagonal(projected, -np.inf)
    top = min(top, len(x) - 1)
    pick = np.zeros(native.shape, dtype=bool)
    rows = np.arange(len(x))[:, None]
    for scores in (native, projected):
        pick[rows, np.argpartition(-scores, top - 1, axis=1)[:, :top]] = True
    a, b = projected[pick], native[pick]
    slope, intercept = np.polyfit(a, b, 1)
    residual = b - (slope * a + intercept)
    return {
        "slope": round(float(slope), 6),
        "intercept": round(float(intercept), 6),
        "pairs": int(pick.sum()),
        "rmse": round(float(np.sqrt((residual**2).mean())), 4),
        "correlation": round(float(np.corrcoef(a, b)[0, 1]), 4),
    }


def write_graph(w: np.ndarray, path: Path) -> None:
    """``embedding = normalize(new_embedding @ W)`` as one small ONNX graph (MatMul, ReduceL2, Max, Div)."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise MissingDependency("writing an adapter graph needs onnx: pip install 'xmodal[export]'") from exc
    d_new, d_old = w.shape
    nodes = [
        helper.make_node("MatMul", [INPUT, "W"], ["projected"]),
        helper.make_node("ReduceL2", ["projected", "axes"], ["norm"], keepdims=1),
        helper.make_node("Max", ["norm", "eps"], ["safe_norm"]),
        helper.make_node("Div", ["projected", "safe_norm"], [OUTPUT]),
    ]
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(w, dtype=np.float32), "W"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "eps"),
    ]
    graph = helper.make_graph(
        nodes,
        "xmodal_adapter",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", d_new])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", d_old])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="xmodal.align")
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def data_hash(texts: list[str], pairs_path: Path | None) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode() + b"\0")
    if pairs_path is not None:
        h.update(sha256_file(pairs_path).encode())
    return h.hexdigest()


def align(
    models_dir: Path,
    new_name: str,
    old_name: str,
    name: str | None = None,
    texts_path: Path | None = None,
    pairs_path: Path | None = None,
    heldout: float = HELDOUT,
    seed: int = 0,
    limit: int | None = None,
    eval_texts: list[Path] | None = None,
    texts: list[str] | None = None,
    texts_label: str | None = None,
) -> AdapterManifest:
    """Fit NEW → OLD on texts (``texts``, named ``texts_label`` in the manifest; else ``texts_path``; else both
    tokenizers' vocabulary words; at most ``limit`` of them) and pairs, measure it
    on a held-out share of the texts (and on ``eval_texts``, other texts never fitted on, where given), and write
    adapter bundle ``<models_dir>/adapters/<name>`` atomically."""
    import datetime as dt

    if not 0 < heldout < 1:
        raise InvalidInput(f"--heldout must be a fraction between 0 and 1, not {heldout}")
    new, old = Encoder(models_dir / new_name, device="cpu"), Encoder(models_dir / old_name, device="cpu")
    for enc in (new, old):
        if "text" not in enc.modalities:
            raise InvalidInput(f"model {enc.name} has no text tower; the fit needs both models' text towers")
    if texts is None:
        texts = read_texts(texts_path) if texts_path else vocabulary_words(new, old)
    texts = sample(texts, limit, seed)
    if len(texts) < 20:
        raise InvalidInput(f"the fit needs at least 20 distinct texts, got {len(texts)}")
    pairs = read_pairs(pairs_path) if pairs_path else []
    x, y, counts = embed_pairs(new, old, texts, pairs)
    order = np.random.default_rng(seed).permutation(len(texts))  # only the plain texts are held out
    n_held = max(10, int(round(heldout * len(texts))))
    data = AlignData(x, y, np.concatenate([order[n_held:], np.arange(len(texts), len(x))]), np.sort(order[:n_held]))
    text_rows = len(texts) + counts.get("pair_texts", 0) * PAIR_WEIGHT  # counts are pairs; each is PAIR_WEIGHT rows
    media = {m: counts[f"pair_{m}"] * PAIR_WEIGHT for m in ("image", "audio") if f"pair_{m}" in counts}
    data.train = data.train[data.train < text_rows]  # the text map: texts only; each media tower gets its own below
    method, w, figures = fit(data)
    tower_maps, start = {}, text_rows
    for modality, n in media.items():  # that tower's queries: the texts plus its own media pairs
        rows = np.concatenate([data.train, np.arange(start, start + n)])
        tower_maps[modality] = FITS[method](x[rows], y[rows])
        start += n
    hx, hy = x[data.heldout], y[data.heldout]
    result = {
        **figures[method],
        "chance_recall@10": round(min(1.0, 10 / len(data.heldout)), 4),
        "identity_heldout_cosine": (
            round(float((normalize(hx) * hy).sum(1).mean()), 4) if hx.shape[1] == hy.shape[1] else None
        ),
        "heldout_texts": int(len(data.heldout)),
        "task": "held-out texts: NEW text embedding projected vs OLD text embedding (cosine); recall@k of each "
        "projected text among all held-out texts' OLD embeddings (its own is the right one)",
    }
    result["transfer"] = []
    for path in eval_texts or []:
        other = read_texts(path)
        ex, ey = new.encode_text(other, batch_size=ENCODE_BATCH), old.encode_text(other, batch_size=ENCODE_BATCH)
        chance = round(min(1.0, 10 / len(other)), 4)
        result["transfer"].append(
            {"texts": str(path), "n": len(other), **quality(ex, ey, w), "chance_recall@10": chance}
        )
    texts_source = texts_label or (str(texts_path) if texts_path else DEFAULT_TEXTS)
    from_ref = ModelRef(name=new.name, fingerprint=new.fingerprint, dim=new.dim)
    to_ref = ModelRef(name=old.name, fingerprint=old.fingerprint, dim=old.dim)
    name = name or f"{new_name}-to-{old_name}"
    target = adapter_dir(models_dir, name)
    with staging_dir(target.parent, name) as tmp:
        write_graph(w, tmp / ONNX_FILE)
        _check_graph(tmp / ONNX_FILE, hx, w)
        towers = {}
        for modality, wm in tower_maps.items():
            towers[modality] = tower_onnx(modality)
            write_graph(wm, tmp / towers[modality])
            _check_graph(tmp / towers[modality], hx, wm)
        manifest = AdapterManifest(
            name=name,
            fingerprint=adapter_fingerprint(tmp, from_ref, to_ref, towers=towers),
            towers=towers,
            from_model=from_ref,
            to_model=to_ref,
            method=method,
            fit={
                "texts": texts_source,
                "pairs": str(pairs_path) if pairs_path else None,
                "counts": counts,
                "rows": int(len(x)),
                "data_sha256": data_hash(texts, pairs_path),
                "heldout_fraction": heldout,
                "seed": seed,
                "pair_weight": PAIR_WEIGHT if pairs else None,
                "candidates": figures,
            },
            quality=result,
            score_map=fit_score_map(hx, hy, w),
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        )
        atomic_write_json(tmp / "manifest.json", manifest.model_dump())
        replace_dir(tmp, target)
    log.info("adapter %s: %s, held-out %s", name, method, result)
    return manifest


def _check_graph(path: Path, x: np.ndarray, w: np.ndarray) -> None:
    """The written graph must give what the numpy fit gives (it is what gets used)."""
    from models.runtime import create_session

    session, _ = create_session(path, device="cpu")
    got = session.run([OUTPUT], {INPUT: x[:64]})[0]
    diff = float(np.abs(got - project(x[:64], w)).max())
    if diff > 1e-5:
        raise InvalidInput(f"the adapter graph differs from the fit by {diff:.2e}; nothing written")
