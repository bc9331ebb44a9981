"""The service under load (issue 14): micro-batching on and off, overload shedding, and the cache-hit path over one and
two worker processes, against a real `xmodal serve` on the demo index.

Usage:
    python bench/service.py [--seconds 15] [--concurrency 1,8,32] [--data DIR]

Prepares xmodal-mini and the demo index (`xmodal demo --no-serve`) in ``--data`` (default: a temporary folder; pass
a folder to reuse it), then for each setting starts `xmodal serve` (a subprocess) and drives it from this process
with asyncio clients over keep-alive connections:

1. Cache-missing text searches (every query distinct, so every request encodes) at each ``--concurrency``, with
   micro-batching off (``XMODAL_BATCH_MAX=1``) and on (the default 32): queries/s, p50/p99 latency, the mean encoder
   batch size (from /metrics), and any non-200 answers by status.
2. Overload: 64 clients against ``XMODAL_MAX_INFLIGHT=8``: how many requests are shed (429) and what the served ones
   wait.
3. Cache hits (the same few queries) at concurrency 32 with ``--workers 1`` and ``--workers 2``.

Prints markdown tables (progress on stderr). About 4 minutes at the defaults on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import table  # noqa: E402
from bench.lifecycle import free_port  # noqa: E402

WORDS = [
    "red",
    "blue",
    "violin",
    "rain",
    "dog",
    "street",
    "night",
    "ocean",
    "wind",
    "piano",
    "city",
    "forest",
    "bird",
    "river",
    "train",
    "snow",
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Serving:
    """`xmodal serve` on a free port with ``env`` settings, until the block ends."""

    def __init__(self, data: Path, env: dict[str, str], workers: int = 1) -> None:
        self.port = free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_") and k != "REDIS_URL"}
        base |= {"XMODAL_DATA_DIR": str(data), "XMODAL_RELOAD_INTERVAL_S": "0", "XMODAL_LOG_FORMAT": "text", **env}
        cmd = [sys.executable, "-m", "service", "serve", "--port", str(self.port), "--workers", str(workers)]
        self.proc = subprocess.Popen(cmd, env=base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Serving:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("the service did not become ready")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)

    def batch_size(self) -> tuple[float, float]:
        """(sum, count) of the text lane's batch sizes so far."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        values = {}
        for name in ("sum", "count"):
            found = re.search(rf'^xmodal_batch_size_{name}\{{lane="text"\}} (\S+)$', text, re.M)
            values[name] = float(found.group(1)) if found else 0.0
        return values["sum"], values["count"]


async def load(url: str, clients: int, seconds: float, tag: str, repeat: bool = False) -> dict:
    latencies, statuses = [], {}
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:

        async def client(w: int) -> None:
            i = 0
            while time.monotonic() < stop:
                i += 1
                words = f"{WORDS[(w + i) % len(WORDS)]} {WORDS[(w * 7 + i) % len(WORDS)]}"
                text = words if repeat else f"{words} {tag} {w} {i}"
                t0 = time.perf_counter()
                r = await http.post("/v1/search", json={"index": "demo", "query": {"text": text}, "k": 10})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    await asyncio.sleep(float(r.headers.get("retry-after", "0.05")) / 10)

        await asyncio.gather(*(client(w) for w in range(clients)))
    ms = np.array(latencies or [0.0]) * 1000
    return {
        "qps": len(latencies) / seconds,
        "p50": np.percentile(ms, 50),
        "p99": np.percentile(ms, 99),
        "other": {s: n for s, n in statuses.items() if s != 200},
    }


def prepare(data: Path) -> None:
    if (data / "indexes" / "demo" / "CURRENT").is_file():
        return
    log(f"preparing the model and the demo index in {data} ...")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_")} | {"XMODAL_DATA_DIR": str(data)}
    subprocess.run([sys.executable, "-m", "service", "demo", "--no-serve"], env=env, check=True)


def run(data: Path, seconds: float, levels: list[int]) -> tuple[list, list, list]:
    encode_rows = []
    for label, batch_max in (("off", "1"), ("on", "32")):
        with Serving(data, {"XMODAL_BATCH_MAX": batch_max, "XMODAL_MAX_INFLIGHT": "512"}) as s:
            asyncio.run(load(s.url, 8, 3, "warm"))
            for clients in levels:
                log(f"micro-batching {label}, {clients} clients ...")
                before = s.batch_size()
                r = asyncio.run(load(s.url, clients, seconds, f"{label}{clients}"))
                after = s.batch_size()
                mean = (after[0] - before[0]) / max(after[1] - before[1], 1)
                row = [label, clients, f"{r['qps']:.1f}", f"{r['p50']:.1f}", f"{r['p99']:.1f}", f"{mean:.1f}"]
                encode_rows.append(row + [str(r["other"] or "-")])
    log("overload: 64 clients, XMODAL_MAX_INFLIGHT=8 ...")
    with Serving(data, {"XMODAL_MAX_INFLIGHT": "8"}) as s:
        r = asyncio.run(load(s.url, 64, seconds, "over"))
        shed = r["other"].get(429, 0)
        served = round(r["qps"] * seconds)
        overload_rows = [[64, 8, f"{r['qps']:.1f}", f"{r['p50']:.1f}", f"{r['p99']:.1f}", shed, served]]
    hit_rows = []
    for workers in (1, 2):
        log(f"cache hits, {workers} worker(s) ...")
        with Serving(data, {"XMODAL_MAX_INFLIGHT": "512"}, workers=workers) as s:
            asyncio.run(load(s.url, 32, 3, "warm", repeat=True))
            r = asyncio.run(load(s.url, 32, seconds, "hit", repeat=True))
            hit_rows.append(
                [workers, 32, f"{r['qps']:.1f}", f"{r['p50']:.1f}", f"{r['p99']:.1f}", str(r["other"] or "-")]
            )
    return encode_rows, overload_rows, hit_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", default="1,8,32", help="client counts of part 1, comma-separated")
    parser.add_argument("--data", type=Path, default=None, help="a data folder to prepare or reuse")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp) / "data"
        prepare(data)
        encode_rows, overload_rows, hit_rows = run(data, args.seconds, levels)
    print("\n## Cache-missing text searches (every request encodes)\n")
    print(table(["micro-batching", "clients", "q/s", "p50 ms", "p99 ms", "mean batch", "not 200"], encode_rows))
    print("\n## Overload\n")
    print(table(["clients", "max in flight", "served q/s", "p50 ms", "p99 ms", "shed (429)", "served"], overload_rows))
    print("\n## Cache hits\n")
    print(table(["workers", "clients", "q/s", "p50 ms", "p99 ms", "not 200"], hit_rows))


if __name__ == "__main__":
    main()
