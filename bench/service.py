"""The service under load (issue 14): micro-batching on and off, the sustainable peak, 2x and 8x overload against
admission, cache hits over one and two worker processes, and the peak RSS of 16 worst-case uploads at once, against
a real `xmodal serve` on the demo index.

Usage:
    python bench/service.py [--seconds 15] [--concurrency 1,8,32] [--data DIR]

Prepares xmodal-mini and the demo index (`xmodal demo --no-serve`) in ``--data`` (default: a temporary folder; pass
a folder to reuse it), then for each setting starts `xmodal serve` (a subprocess) and offers it load from another
process, bench/loadgen.py: uvloop, raw keep-alive connections, request bytes built in advance, so that it takes
little of the cores the service needs (its CPU, the service's and the rest of the machine's are reported for each
run: on a shared machine, read the figures with them).

1. Cache-missing text searches (every query distinct, so every request encodes) from ``--concurrency`` closed-loop
   clients, micro-batching off (``XMODAL_BATCH_MAX=1``) and on (the default 32), admission fixed at 512 in flight
   (``XMODAL_QUEUE_TARGET_MS=0``): queries/s, p50/p99, the mean encoder batch (from /metrics), non-200 answers.
   The sustainable peak is the best micro-batched row with 8 or more clients. Then the same for image searches:
   real COCO photos (../shared/data/coco-mini; skipped when absent) as base64, every request's bytes distinct.
2. Overload, default settings: open-loop arrivals (Poisson) at 2x and 8x the peak, then 64 closed-loop clients that
   honour Retry-After; and 8x against the fixed limit of before (``XMODAL_QUEUE_TARGET_MS=0``, 64 in flight).
   Open loop, because overload is many independent users: a refused request does not slow the arrivals of the
   others (closed-loop clients slow down as the service does, so they never offer 8x). A refused request is not
   retried in the open-loop runs (a retry is one more arrival); the closed-loop run shows what clients that wait
   as told do. Every request has a 5 s client timeout. Reported: goodput (200s/s) and its share of the peak, 429s,
   5xx, client timeouts, p50/p99 of the admitted (200) requests, from when each request was due. Other processes
   share this machine, so the peak is measured again just before and after the overload runs (a fixed-limit server
   of its own, up meanwhile) and the goodput is compared with the mean of those two.
3. Cache hits (the same 16 queries) from 32 clients with ``--workers 1`` and ``--workers 2``.
4. Peak RSS: worst-case uploads (`/v1/search/file`, multipart), one alone, then 16 at once: 8000x8000 1-bit PNGs
   (8 KB, ~370 MB to decode), 1x64,000,000 PNGs (refused from the header), 599 s of 48 kHz audio (a FLAC of 90 KB,
   ~310 MB to decode and resample) and 10 MB WAVs (the body limit). Default settings but admission off
   (``XMODAL_QUEUE_TARGET_MS=0``), so that all 16 reach decoding: the worst case for memory. The service's RSS
   before, its peak (VmHWM, reset before each row, and VmRSS polled every 2 ms) and after, and the answers by
   status. Target: no request raises RSS by more than 512 MB (alone: its own rise; 16 at once: their rise / 16).

Prints markdown tables (progress on stderr). About 5 minutes at the defaults on 2 cores, and 2 more to prepare the
data folder (none with ``--data`` of an earlier run).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import table  # noqa: E402
from bench.lifecycle import free_port  # noqa: E402

LOADGEN = Path(__file__).with_name("loadgen.py")
PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini" / "images"
MB = 1 << 20


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


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

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of /metrics (0 when absent); ``labels`` as written there, e.g. ``lane="text"``, among others
        (the batch series also carry the model)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        among = rf"\{{(?:[^}}]*,)?{re.escape(labels)}(?:,[^}}]*)?\}}" if labels else ""
        found = re.search(rf"^{re.escape(name)}{among} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    def batches(self, lane: str) -> tuple[float, float]:
        """(queries, batches) the lane (text, image) has encoded so far."""
        return (
            self.metric("xmodal_batch_size_sum", f'lane="{lane}"'),
            self.metric("xmodal_batch_size_count", f'lane="{lane}"'),
        )

    def load(self, seconds: float, *options: str) -> dict:
        """bench/loadgen.py against this service, watching its CPU; its JSON summary, with the mean batch of the
        lane the queries go to."""
        cmd = [sys.executable, str(LOADGEN), "--url", self.url, "--seconds", str(seconds)]
        lane = "image" if "image" in options else "text"
        before = self.batches(lane)
        run = subprocess.run(
            [*cmd, "--watch", str(self.proc.pid), *options], capture_output=True, text=True, check=True
        )
        after = self.batches(lane)
        result = json.loads(run.stdout.strip().splitlines()[-1])
        result["mean_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
        return result

    # --- memory (Linux /proc) ---------------------------------------------------------------------------------------
    def status_kb(self, field: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    def reset_peak(self) -> bool:
        """VmHWM back to the current RSS (Linux 4.0+; False where not allowed)."""
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False


def others(statuses: dict[str, int], *known: str) -> str:
    rest = {s: n for s, n in statuses.items() if s not in known}
    return ", ".join(f"{n} x {s}" for s, n in sorted(rest.items())) or "-"


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# --- 1. cache-missing searches: micro-batching off and on -------------------------------------------------------------
def encode_rates(data: Path, seconds: float, levels: list[int], *kind: str) -> tuple[list, float, int]:
    """The rows, the sustainable peak (best micro-batched q/s with 8+ clients) and its client count; ``kind``:
    loadgen options of the queries (default: distinct texts)."""
    rows, peak, best = [], 0.0, 8
    for label, batch_max in (("off", "1"), ("on", "32")):
        env = {"XMODAL_BATCH_MAX": batch_max, "XMODAL_MAX_INFLIGHT": "512", "XMODAL_QUEUE_TARGET_MS": "0"}
        with Serving(data, env) as s:
            s.load(3, "--mode", "closed", "--clients", "8", "--tag", f"warm{label}", *kind)
            for clients in levels:
                log(f"micro-batching {label}, {clients} closed-loop clients {' '.join(kind)} ...")
                r = s.load(seconds, "--mode", "closed", "--clients", str(clients), "--tag", f"{label}{clients}", *kind)
                mean = r["mean_batch"]
                if label == "on" and clients >= 8 and r["ok_per_s"] > peak:
                    peak, best = r["ok_per_s"], clients
                rows.append(
                    [label, clients, fmt(r["ok_per_s"]), fmt(r["p50_ms"]), fmt(r["p99_ms"]), f"{mean:.1f}"]
                    + [others(r["statuses"], "200"), fmt(r["cpu_cores"], 2), fmt(r["service_cores"], 2)]
                    + [fmt(r["other_cores"], 2)]
                )
    return rows, peak, best


# --- 2. overload ------------------------------------------------------------------------------------------------------
def overload_row(label: str, admission: str, r: dict, peak: float) -> list:
    statuses = r["statuses"]
    fives = sum(n for s, n in statuses.items() if s.startswith("5"))
    offered = f"{r['offered_per_s']:.0f}/s" if r["offered_per_s"] else f"{r['clients']} clients (closed)"
    return [
        label,
        admission,
        offered,
        fmt(r["ok_per_s"]),
        f"{r['ok_per_s'] / peak:.0%}" if peak else "-",
        statuses.get("429", 0),
        fives,
        r["timeouts"] + r["errors"] + r["not_sent"],
        fmt(r["p50_ms"]),
        fmt(r["p99_ms"]),
        fmt(r["max_ms"]),
        fmt(r["mean_batch"]),
        fmt(r["cpu_cores"], 2),
        fmt(r["service_cores"], 2),
        fmt(r["other_cores"], 2),
        load_average().split()[0],
    ]


def overload(data: Path, seconds: float, peak: float, clients: int) -> tuple[list, float]:
    """2x and 8x ``peak`` against default settings, and the closed-loop clients; between two measurements of the
    peak again (``clients`` closed-loop clients, a fixed limit, a server of its own, up meanwhile), so that the
    goodput is compared with what the machine gave the service just before and after (other processes share it).
    Then 8x against the fixed limit of before. The rows, and the peak they are compared with (the two's mean)."""
    runs = []
    fixed = {"XMODAL_MAX_INFLIGHT": "512", "XMODAL_QUEUE_TARGET_MS": "0"}
    with Serving(data, fixed) as f, Serving(data, {}) as a:
        for s, tag in ((f, "warmf"), (a, "warma")):
            s.load(3, "--mode", "closed", "--clients", "8", "--tag", tag)
        log(f"peak again, {clients} closed-loop clients ...")
        runs.append(("peak, before", "fixed, 512", f.load(seconds, "--mode", "closed", "--clients", str(clients))))
        for times in (2, 8):
            log(f"{times}x the peak ({times * peak:.0f}/s), open loop, default settings ...")
            r = a.load(seconds, "--mode", "open", "--rate", f"{times * peak:.1f}", "--tag", f"x{times}", "--seed", "1")
            runs.append((f"{times}x, open loop", "adaptive (default)", r))
        log("64 closed-loop clients honouring Retry-After, default settings ...")
        r = a.load(seconds, "--mode", "closed", "--clients", "64", "--honour", "--tag", "closed64")
        runs.append(("64 clients, closed loop, Retry-After", "adaptive (default)", r))
        log(f"peak again, {clients} closed-loop clients ...")
        r = f.load(seconds, "--mode", "closed", "--clients", str(clients), "--tag", "again")
        runs.append(("peak, after", "fixed, 512", r))
    log("8x against the fixed limit of before (64 in flight, XMODAL_QUEUE_TARGET_MS=0) ...")
    with Serving(data, {"XMODAL_QUEUE_TARGET_MS": "0"}) as s:
        s.load(3, "--mode", "closed", "--clients", "8", "--tag", "warmfixed")
        r = s.load(seconds, "--mode", "open", "--rate", f"{8 * peak:.1f}", "--tag", "fixed8", "--seed", "1")
        runs.append(("8x, open loop", "fixed, 64 (before)", r))
    reference = (runs[0][2]["ok_per_s"] + runs[-2][2]["ok_per_s"]) / 2
    return [overload_row(label, admission, r, reference) for label, admission, r in runs], reference


# --- 3. cache hits ----------------------------------------------------------------------------------------------------
def cache_hits(data: Path, seconds: float) -> list:
    rows = []
    for workers in (1, 2):
        log(f"cache hits, {workers} worker(s) ...")
        env = {"XMODAL_MAX_INFLIGHT": "512", "XMODAL_QUEUE_TARGET_MS": "0"}
        with Serving(data, env, workers=workers) as s:
            s.load(3, "--mode", "closed", "--clients", "32", "--kind", "hit")
            r = s.load(seconds, "--mode", "closed", "--clients", "32", "--kind", "hit")
            # with 2 workers, --watch sees the supervisor only: the service's CPU is then in "other"
            rows.append(
                [workers, 32, fmt(r["ok_per_s"]), fmt(r["p50_ms"]), fmt(r["p99_ms"]), others(r["statuses"], "200")]
                + [fmt(r["cpu_cores"], 2)]
            )
    return rows


# --- 4. peak RSS under worst-case uploads -----------------------------------------------------------------------------
def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@functools.cache
def zeros_idat(width: int, height: int) -> bytes:
    """The IDAT chunk of a 1-bit grey image of zeros, compressed row block by row block (Pillow would take minutes
    and gigabytes for 1x64M)."""
    row = b"\0" * (1 + (width + 7) // 8)
    z, parts, rows = zlib.compressobj(9), [], 1 << 16
    for start in range(0, height, rows):
        parts.append(z.compress(row * min(rows, height - start)))
    parts.append(z.flush())
    return chunk(b"IDAT", b"".join(parts))


def png_1bit(width: int, height: int, tag: str) -> bytes:
    """That image as a PNG, with a tEXt chunk that makes each file's bytes (its cache key) its own."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    text = chunk(b"tEXt", b"Comment\0" + tag.encode())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + text + zeros_idat(width, height) + chunk(b"IEND", b"")


@functools.cache
def sound(seconds: float, rate: int, fmt_: str, amplitude: float) -> bytes:
    """Mono 16-bit audio: silence, or noise of ``amplitude``."""
    import soundfile as sf

    n = int(seconds * rate)
    wave = (amplitude * np.random.default_rng(0).standard_normal(n)).astype(np.float32) if amplitude else np.zeros(n)
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt_, subtype="PCM_16")
    return buf.getvalue()


def tagged_audio(data: bytes, tag: int) -> bytes:
    """The same sound in other bytes (its cache key its own): for FLAC a PADDING block after STREAMINFO, for WAV a
    chunk of its own before the data."""
    if data.startswith(b"fLaC"):
        info_end = 4 + 4 + 34
        last = data[4] & 0x80  # STREAMINFO was the only metadata block: the padding becomes the last one
        padding = bytes([0x01 | last]) + (tag + 1).to_bytes(3, "big") + bytes(tag + 1)
        return b"fLaC" + bytes([data[4] & 0x7F]) + data[5:info_end] + padding + data[info_end:]
    at = data.index(b"data")
    extra = b"xmtg" + struct.pack("<I", 4) + struct.pack("<I", tag)
    size = struct.unpack("<I", data[4:8])[0] + len(extra)
    return data[:4] + struct.pack("<I", size) + data[8:at] + extra + data[at:]


UPLOADS = [  # (label, content type, file name, the i-th file: each its own bytes, so that no cache answers)
    ("8000x8000 1-bit PNG", "image/png", "x.png", lambda i: png_1bit(8000, 8000, f"bomb {i}")),
    ("1x64,000,000 1-bit PNG", "image/png", "x.png", lambda i: png_1bit(1, 64_000_000, f"tall {i}")),
    ("599 s of 48 kHz audio (FLAC)", "audio/flac", "x.flac", lambda i: tagged_audio(sound(599, 48000, "FLAC", 0), i)),
    ("10 MB WAV (104 s, 48 kHz)", "audio/wav", "x.wav", lambda i: tagged_audio(sound(104, 48000, "WAV", 0.1), i)),
]


def peak_rss(s: Serving, files: list[bytes], ctype: str, name: str) -> tuple[list[int], int, int, int]:
    """``files`` uploaded to /v1/search/file all at once: (statuses, RSS before, peak, after) in KB."""
    time.sleep(1)
    before = s.status_kb("VmRSS")
    reset = s.reset_peak()
    polled, done = [before], threading.Event()

    def poll() -> None:
        while not done.is_set():
            polled[0] = max(polled[0], s.status_kb("VmRSS"))
            time.sleep(0.002)

    def one(data: bytes) -> int:
        with httpx.Client(base_url=s.url, timeout=120) as c:
            form = {"index": "demo", "k": "5"}
            return c.post("/v1/search/file", data=form, files={"file": (name, data, ctype)}).status_code

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with ThreadPoolExecutor(len(files)) as pool:
            codes = list(pool.map(one, files))
    finally:
        done.set()
        poller.join()
    peak = max(polled[0], s.status_kb("VmHWM") if reset else 0)
    time.sleep(1)
    return codes, before, peak, s.status_kb("VmRSS")


def uploads(data: Path) -> list:
    """Admission off (a fixed limit of 64): all 16 reach decoding, the worst case for memory."""
    rows = []
    with Serving(data, {"XMODAL_QUEUE_TARGET_MS": "0"}) as s:
        for label, ctype, name, make in UPLOADS:
            log(f"peak RSS: {label}, 1 alone, then 16 at once ...")
            files = [make(i) for i in range(17)]
            for group in (files[:1], files[1:]):
                codes, before, peak, after = peak_rss(s, group, ctype, name)
                statuses = ", ".join(f"{codes.count(c)} x {c}" for c in sorted(set(codes)))
                rise = (peak - before) / 1024
                rows.append(
                    [label, f"{len(group[0]) / 1024:,.0f} KB", len(group), statuses, f"{before / 1024:.0f}"]
                    + [f"{peak / 1024:.0f}", f"{after / 1024:.0f}", f"{rise:.0f}", f"{rise / len(group):.0f}"]
                )
    return rows


def prepare(data: Path) -> None:
    if (data / "indexes" / "demo" / "CURRENT").is_file():
        return
    log(f"preparing the model and the demo index in {data} ...")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_")} | {"XMODAL_DATA_DIR": str(data)}
    subprocess.run([sys.executable, "-m", "service", "demo", "--no-serve"], env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15, help="each measured run")
    parser.add_argument("--concurrency", default="1,8,32", help="closed-loop client counts of part 1")
    parser.add_argument("--data", type=Path, default=None, help="a data folder to prepare or reuse")
    parser.add_argument("--parts", default="1,2,3,4", help="which parts to run (2 needs 1: the peak)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    parts = set(args.parts.split(","))
    t0, load0 = time.monotonic(), load_average()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp) / "data"
        prepare(data)
        t1 = time.monotonic()
        encode_rows, peak, best = encode_rates(data, args.seconds, levels) if parts & {"1", "2"} else ([], 0.0, 8)
        image_rows = []
        if "1" in parts and PHOTOS.is_dir():
            image_rows, _, _ = encode_rates(data, args.seconds, levels, "--kind", "image", "--images", str(PHOTOS))
        overload_rows, reference = overload(data, args.seconds, peak, best) if "2" in parts and peak else ([], 0.0)
        hit_rows = cache_hits(data, args.seconds) if "3" in parts else []
        rss_rows = uploads(data) if "4" in parts else []
    print(f"\nload average (1, 5, 15 min): {load0} at the start, {load_average()} at the end; ", end="")
    print(f"{time.monotonic() - t1:.0f} s measuring, {t1 - t0:.0f} s preparing; {os.cpu_count()} CPUs")
    cores = ["load gen cores", "service cores", "other cores"]
    rate_head = ["micro-batching", "clients", "q/s", "p50 ms", "p99 ms", "mean batch", "not 200", *cores]
    if encode_rows:
        print("\n## Cache-missing text searches (every request encodes; closed loop, fixed limit 512)\n")
        print(table(rate_head, encode_rows))
        print(f"\nSustainable peak (best micro-batched row, 8+ clients): {peak:.1f} q/s at {best} clients")
    if image_rows:
        print(f"\n## Cache-missing image searches (COCO photos of {PHOTOS}, each request's bytes distinct)\n")
        print(table(rate_head, image_rows))
    elif "1" in parts:
        print(f"\nImage searches not measured: no photos at {PHOTOS} (the shared data folder is absent).")
    if overload_rows:
        print(f"\n## Overload (cache-missing text searches; offered: 2x and 8x {peak:.1f}/s; 5 s client timeout)\n")
        print(f"'of peak': 200/s over {reference:.1f} q/s, the mean of the peak measured again before and after.\n")
        head = ["load", "admission", "offered", "200/s", "of peak", "429", "5xx", "timeouts+errors", "p50 ms"]
        print(table([*head, "p99 ms", "max ms", "mean batch", *cores, "load 1m"], overload_rows))
    if hit_rows:
        print("\n## Cache hits (32 closed-loop clients)\n")
        print(table(["workers", "clients", "q/s", "p50 ms", "p99 ms", "not 200", "load gen cores"], hit_rows))
    if rss_rows:
        print("\n## Peak RSS: worst-case uploads, 1 alone and 16 at once (/v1/search/file, admission off)\n")
        head = ["upload", "file", "at once", "answers", "RSS before MB", "peak MB", "after MB", "peak - before MB"]
        print(table([*head, "per request MB"], rss_rows))
        worst = max(float(row[-1]) for row in rss_rows)
        print(
            f"\nTarget, no request raises RSS by more than 512 MB: {'met' if worst <= 512 else 'MISSED'} (at most "
            f"{worst:.0f} MB a request; 16 at once: their rise together / 16)."
        )


if __name__ == "__main__":
    main()
