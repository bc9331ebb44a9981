"""`--engine ray` against the local engine on the same cores (issue 15): items/s and what Ray costs.

Usage:
    python bench/ray_engine.py [--texts 10000] [--media 600] [--batch-size 32] [--models DIR]

Encodes the same corpora with ``indexer.encode.encode_items``, as a build does (checkpoints off): a text corpus of
``--texts`` demo captions, and ``--media`` generated pictures and as many sounds, each with its caption. Each corpus
goes through the local engine (one process, ONNX Runtime on every core) and through ``RayEngine`` as
``xmodal index build --engine ray`` runs it: a fresh local Ray started and stopped by the engine, with 2 actors of 1
CPU each (the default on 2 cores) and with 1 actor of 2 CPUs. Per run: the wall time and items/s (rows: an item with a
caption and a picture is two); the CPU time it took (this process and every process below it: Ray's too) and rows
per CPU second, which other work on a shared machine skews far less than wall time; for Ray, where its time went:
starting Ray, until the first chunk came back (the actors start, import and load the model, then encode a chunk),
the steady rate from the first chunk to the last, and stopping Ray; the overhead against the local engine, in all
(wall time) and per row at the steady rate; the largest difference from the local engine's vectors; and the share
of the machine's CPU time other processes took meanwhile. ``--models`` reuses a folder holding a prepared xmodal-mini
(else one is prepared, ~20 s).

Prints markdown tables (progress on stderr). About 4 minutes with the defaults on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import _cpu_times, cpu_model, table  # noqa: E402
from bench.resume import text_corpus  # noqa: E402
from indexer.corpus import CorpusItem, read_corpus  # noqa: E402
from indexer.demo import write_media_demo  # noqa: E402
from indexer.encode import Encoded, encode_items  # noqa: E402
from indexer.ray_engine import RayEngine  # noqa: E402
from models.bundle import DEFAULT_MODEL  # noqa: E402
from models.encoder import Encoder  # noqa: E402
from models.registry import prepare  # noqa: E402


class TreeLoad:
    """CPU seconds used by this process and every process below it (a local Ray's GCS, raylet and workers are
    children and grandchildren of the driver, and nobody here waits for them, so ``os.times`` misses them): each
    one's utime + stime from /proc, sampled every 0.2 s (a process's last 0.2 s before it exits can be missed). And
    the share of the machine's CPU time the other processes took meanwhile."""

    def __enter__(self) -> TreeLoad:
        self._last: dict[int, float] = {}
        self._sample()
        self._before = dict(self._last)  # what the processes alive now had used already
        self._stop = threading.Event()
        self._machine0 = _cpu_times()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        total1, idle1 = _cpu_times()
        tick = os.sysconf("SC_CLK_TCK")
        total = (total1 - self._machine0[0]) / tick
        busy = total - (idle1 - self._machine0[1]) / tick
        self.cpu_s = sum(t - self._before.get(pid, 0.0) for pid, t in self._last.items())
        self.other_share = 100 * max(busy - self.cpu_s, 0.0) / max(total, 1e-9)

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def _sample(self) -> None:
        tick, parents, times = os.sysconf("SC_CLK_TCK"), {}, {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue  # it exited meanwhile
                parents[int(entry.name)] = int(fields[1])
                times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
        ours = {os.getpid()}
        grew = True
        while grew:  # children, then theirs, ...
            found = {pid for pid, parent in parents.items() if parent in ours} - ours
            ours |= found
            grew = bool(found)
        # A process's time only grows; one that exited keeps its last sample.
        self._last.update({pid: times[pid] for pid in ours if pid in times and times[pid] >= self._last.get(pid, 0.0)})


def timed(encoder: Encoder, items: list[CorpusItem], batch: int, engine: RayEngine | None) -> dict:
    """One encoding: wall seconds, when the first and the last chunk came back (and the first's size), the result."""
    seen: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    encoded = encode_items(
        encoder, items, batch, lambda done, total: seen.append((time.perf_counter(), done)), engine=engine
    )
    wall = time.perf_counter() - t0
    return {"wall": wall, "first": seen[0][0] - t0, "first_n": seen[0][1], "last": seen[-1][0] - t0, "out": encoded}


def rows_for(corpus: str, encoder: Encoder, items: list[CorpusItem], batch: int) -> list[list[object]]:
    print(f"{corpus}: local engine ...", file=sys.stderr)
    # Warm the session first: its one-time costs are not the local rate (an actor's are Ray's, in "to 1st chunk").
    encode_items(encoder, items[:: max(1, len(items) // 16)], batch, None)
    with TreeLoad() as load:
        local = timed(encoder, items, batch, None)
    reference: Encoded = local["out"]
    n = len(reference.rows)
    local_rate = n / local["wall"]
    out = [
        [corpus, n, "local", f"{local['wall']:.1f}", f"{local_rate:.0f}", f"{load.cpu_s:.1f}", f"{n / load.cpu_s:.0f}"]
        + ["-"] * 7
        + [f"{load.other_share:.0f}%"]
    ]
    for actors in (2, 1):
        print(f"{corpus}: ray, {actors} actor(s) ...", file=sys.stderr)
        engine = RayEngine(actors=actors, device="cpu")
        with TreeLoad() as load:
            run = timed(encoder, items, batch, engine)
        ran = engine.describe()
        start = ran["startup_seconds"]
        # Steady: the rows of every chunk after the first, from the first chunk's return to the last's.
        steady = (n - run["first_n"]) / max(run["last"] - run["first"], 1e-9)
        same_rows = [(r.item.id, r.modality) for r in run["out"].rows] == [
            (r.item.id, r.modality) for r in reference.rows
        ]
        diff = float(np.abs(run["out"].vectors - reference.vectors).max()) if same_rows else None
        out.append(
            [
                corpus,
                n,
                f"ray {ran['actors']}x{ran['cpus_per_actor']} CPU",
                f"{run['wall']:.1f}",
                f"{n / run['wall']:.0f}",
                f"{load.cpu_s:.1f}",
                f"{n / load.cpu_s:.0f}",
                f"{start:.1f}",
                f"{run['first'] - start:.1f}",
                f"{steady:.0f}",
                f"{run['wall'] - run['last']:.1f}",
                f"{run['wall'] - local['wall']:+.1f}",
                f"{1000 / steady - 1000 / local_rate:+.2f}",
                "rows differ" if diff is None else f"{diff:.1e}",
                f"{load.other_share:.0f}%",
            ]
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=10_000, help="text items")
    parser.add_argument("--media", type=int, default=600, help="pictures, and as many sounds (each with a caption)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models", type=Path, help="a models folder with xmodal-mini prepared (default: prepare one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        models = args.models
        if models is None:
            print("preparing xmodal-mini ...", file=sys.stderr)
            models = Path(tmp) / "models"
            prepare(models)
        encoder = Encoder(models / DEFAULT_MODEL, device="cpu")
        print("writing the corpora ...", file=sys.stderr)
        texts = read_corpus(text_corpus(Path(tmp), args.texts))
        media = read_corpus(write_media_demo(Path(tmp) / "media", n_scenes=args.media, n_sounds=args.media))
        rows = rows_for("text", encoder, texts, args.batch_size)
        rows += rows_for("media", encoder, media, args.batch_size)

    print(f"{os.cpu_count()} CPUs ({cpu_model()}), batch {args.batch_size}, encode_items with checkpoints off\n")
    headers = [
        "corpus",
        "rows",
        "engine",
        "wall s",
        "rows/s",
        "CPU s",
        "rows/CPU s",
        "Ray start s",
        "to 1st chunk s",
        "steady rows/s",
        "Ray stop s",
        "overhead s",
        "ms/row vs local (steady)",
        "max |Δ| vs local",
        "others' CPU",
    ]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
