"""A cheap HTTP/1.1 load generator for bench/service.py, run as a process of its own so that the load it makes is
measured apart from the service (it reports its own CPU time).

Cheap by construction: uvloop when installed, one asyncio Protocol per keep-alive connection driven by callbacks (no
task, future or timer per request), request bytes built before the clock starts, responses parsed only as far as
the status line, Content-Length, Connection and Retry-After(-Ms). No HTTP library: httpx costs about a millisecond
of CPU per request, more than a search's encode.

Two ways to offer load:

- ``--mode open --rate R``: open-loop arrivals, a Poisson process of rate R/s whatever the service answers (many
  independent users: a refused request does not slow the arrivals of the others, nor is it retried). Each arrival
  takes an idle connection, or opens one (up to ``--connections``; past that it is counted ``not_sent``). Latency
  counts from the arrival's scheduled time, so a generator running late cannot hide the service's delays.
- ``--mode closed --clients N``: N clients, each sends its next request when its answer comes; with ``--honour``
  a refused client first waits what Retry-After-Ms (else Retry-After) says.

A request not answered within ``--timeout`` is a client timeout (its connection is dropped). Prints one JSON object:
answers by status, timeouts, connection errors, not sent, p50/p90/p99/max latency of the 200s (ms), goodput (200s
per second), this process's CPU time and, with ``--watch PID``, the service's and the rest of the machine's.

    python bench/loadgen.py --url http://127.0.0.1:8000 --mode open --rate 400 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import resource
import time
from collections.abc import Callable
from urllib.parse import urlsplit

TICK_S = 0.002  # open loop: arrivals due within a tick are sent together (their latency counts from when due)
SWEEP_S = 0.05  # how often requests past their timeout are looked for
WORDS = ["red", "blue", "violin", "rain", "dog", "street", "night", "ocean"]
WORDS += ["wind", "piano", "city", "forest", "bird", "river", "train", "snow"]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy() -> float:
    """CPU seconds all cores have been busy so far (Linux /proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / TICKS


def header(head: bytes, name: bytes) -> bytes | None:
    at = head.find(b"\r\n" + name + b":")
    if at < 0:
        return None
    start = at + len(name) + 3
    end = head.find(b"\r\n", start)
    return head[start : end if end >= 0 else len(head)].strip()


class Photos:
    """Image queries (``--kind image``): JPEG photos sent as base64 in ``query.image``, each request's bytes made
    distinct (so every one misses the caches) by a JPEG comment segment after the start-of-image marker, the
    picture unchanged. The comment makes the inserted bytes a multiple of 3, so a request's base64 is the base64 of
    the marker and comment, then the photo's own base64 after its marker, computed once."""

    def __init__(self, folder: str, index: str) -> None:
        files = sorted(
            (p for p in os.scandir(folder) if p.name.lower().endswith((".jpg", ".jpeg"))), key=lambda p: p.name
        )
        if not files:
            raise SystemExit(f"--images {folder}: no JPEG photos there")
        self.rests = []
        for entry in files:
            with open(entry.path, "rb") as f:
                data = f.read()
            if data[:2] != b"\xff\xd8":
                raise SystemExit(f"{entry.path} is not a JPEG")
            self.rests.append(base64.b64encode(data[2:]))
        self.head = json.dumps({"index": index, "query": {"image": ""}, "k": 10}).encode().split(b'""')

    def body(self, i: int, tag: str) -> bytes:
        payload = tag.encode()[:60].ljust(60)  # SOI (2) + marker and length (4) + 60: 66, a multiple of 3
        head = b"\xff\xd8\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload
        image = base64.b64encode(head) + self.rests[i % len(self.rests)]
        return self.head[0] + b'"' + image + b'"' + self.head[1]


class Conn(asyncio.Protocol):
    """One keep-alive connection, one request at a time; ``done(conn, status, retry_ms)`` when its answer is in
    (status 0: the connection failed)."""

    def __init__(self, done: Callable[[Conn, int, float], None]) -> None:
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1
        self.t0 = 0.0  # when the request in flight was due; 0: none in flight
        self.close_after = False
        self.closed = False
        self.reused = False  # it has answered a request before: the service may close it as idle at any time
        self.status, self.retry_ms = 0, 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, t0: float) -> None:
        self.buf.clear()
        self.need, self.t0 = -1, t0
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            self.status = int(head[9:12])
            self.need = end + 4 + int(header(head, b"content-length") or 0)
            self.close_after = header(head, b"connection") == b"close"
            self.retry_ms = 0.0
            if self.status == 429:
                ms, s = header(head, b"retry-after-ms"), header(head, b"retry-after")
                self.retry_ms = float(ms) if ms else float(s) * 1000 if s else 0.0
        if len(self.buf) >= self.need and self.t0:
            self.done(self, self.status, self.retry_ms)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.t0:
            self.done(self, 0, 0.0)

    def drop(self) -> None:
        self.closed, self.t0 = True, 0.0
        if self.transport is not None:
            self.transport.abort()


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        url = urlsplit(args.url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.loop = asyncio.get_running_loop()
        self.statuses: dict[int, int] = {}
        self.latencies: list[float] = []
        self.timeouts = self.errors = self.not_sent = self.sent = 0
        self.rng = random.Random(args.seed)
        self.idle: list[Conn] = []
        self.busy: set[Conn] = set()
        self.opened = 0
        self.opening: set[asyncio.Task] = set()
        self.next_request = 0
        n = int(args.rate * args.seconds * 1.3) + 64 if args.mode == "open" else args.clients * 64
        if args.kind == "image":
            self.photos = Photos(args.images, args.index)
            n = min(n, 512)  # a photo's request is ~200 KB: the rest are built as they are sent (a copy each)
        self.requests = [self.build(i) for i in range(n)]
        self.on_answer: Callable[[Conn, int, float], None] | None = None  # closed loop: the client's next step

    def build(self, i: int) -> bytes:
        if self.args.kind == "image":
            body = self.photos.body(i, f"{self.args.tag} {i}")
        else:
            words = f"{WORDS[i % 16]} {WORDS[(i * 7 + i // 16) % 16]}"
            text = words if self.args.kind == "hit" else f"{words} {self.args.tag} {i}"
            body = json.dumps({"index": self.args.index, "query": {"text": text}, "k": 10}).encode()
        head = f"POST {self.args.path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body

    def request_bytes(self) -> bytes:
        i = self.next_request
        self.next_request += 1
        if i < len(self.requests):
            return self.requests[i]
        return self.build(i)

    # --- connections ----------------------------------------------------------------------------------------------
    async def connect(self) -> Conn:
        self.opened += 1
        try:
            _t, conn = await self.loop.create_connection(lambda: Conn(self.answered), self.host, self.port)
        except OSError:
            self.opened -= 1
            raise
        return conn

    def take_idle(self) -> Conn | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
            self.opened -= 1  # the service closed it meanwhile
        return None

    def send(self, conn: Conn, t0: float) -> None:
        self.sent += 1
        self.busy.add(conn)
        conn.send(self.request_bytes(), t0)

    def send_new(self, t0: float) -> None:
        """On a new connection (none idle)."""

        async def go() -> None:
            try:
                conn = await self.connect()
            except OSError:
                self.errors += 1
                return
            self.send(conn, t0)

        task = self.loop.create_task(go())
        self.opening.add(task)
        task.add_done_callback(self.opening.discard)

    def answered(self, conn: Conn, status: int, retry_ms: float) -> None:
        t0, conn.t0 = conn.t0, 0.0
        self.busy.discard(conn)
        if status == 0:
            self.opened -= 1
            if conn.reused and not conn.buf:  # closed as idle just as the request went out: as HTTP clients do,
                self.sent -= 1  # send it again on a new connection (latency still from when it was due)
                self.send_new(t0)
                return
            self.errors += 1
        else:
            conn.reused = True
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == 200:
                self.latencies.append(self.loop.time() - t0)
            if conn.close_after:
                conn.drop()
                self.opened -= 1
            else:
                self.idle.append(conn)
        if self.on_answer is not None:
            self.on_answer(conn, status, retry_ms)

    async def sweep(self) -> None:
        """Requests past their timeout: counted, their connections dropped."""
        while True:
            await asyncio.sleep(SWEEP_S)
            late = self.loop.time() - self.args.timeout
            for conn in [c for c in self.busy if c.t0 and c.t0 < late]:
                self.busy.discard(conn)
                self.timeouts += 1
                self.opened -= 1
                conn.drop()

    # --- offering load --------------------------------------------------------------------------------------------
    async def open_loop(self, stop: float) -> None:
        loop, rate, limit = self.loop, self.args.rate, self.args.connections
        due = loop.time()
        while due < stop:
            now = loop.time()
            while due <= now and due < stop:
                conn = self.take_idle()
                if conn is not None:
                    self.send(conn, due)
                elif self.opened < limit:
                    self.send_new(due)
                else:
                    self.not_sent += 1
                due += self.rng.expovariate(rate)
            await asyncio.sleep(max(TICK_S, due - loop.time()))

    async def closed_loop(self, stop: float) -> None:
        loop, honour = self.loop, self.args.honour

        def next_step(conn: Conn, status: int, retry_ms: float) -> None:
            if loop.time() >= stop:
                return
            if status == 429 and honour:
                loop.call_later(retry_ms / 1000, start_one)
            elif status != 200:
                loop.call_later(0.01, start_one)  # an error: not a busy loop
            else:
                start_one()

        def start_one() -> None:
            if loop.time() >= stop:
                return
            conn = self.take_idle()
            if conn is not None:
                self.send(conn, loop.time())
            else:
                self.send_new(loop.time())

        self.on_answer = next_step
        for _ in range(self.args.clients):
            start_one()
        await asyncio.sleep(max(0.0, stop - loop.time()))

    async def main(self) -> dict:
        args = self.args
        for _ in range(min(args.preconnect, args.connections)):
            self.idle.append(await self.connect())
        sweeper = self.loop.create_task(self.sweep())
        watch = args.watch
        cpu0, t0 = cpu_seconds(), self.loop.time()
        served0, busy0 = (process_cpu(watch), machine_busy()) if watch else (0.0, 0.0)
        stop = t0 + args.seconds
        await (self.open_loop(stop) if args.mode == "open" else self.closed_loop(stop))
        while (self.busy or self.opening) and self.loop.time() < stop + args.timeout + 1:  # the last answers
            await asyncio.sleep(0.01)
        wall, cpu = self.loop.time() - t0, cpu_seconds() - cpu0
        served, busy = (process_cpu(watch) - served0, machine_busy() - busy0) if watch else (0.0, 0.0)
        sweeper.cancel()
        for conn in self.idle + list(self.busy):
            conn.drop()
        ms = sorted(x * 1000 for x in self.latencies)

        def pct(p: float) -> float | None:
            return round(ms[min(len(ms) - 1, int(p / 100 * len(ms)))], 1) if ms else None

        return {
            "mode": args.mode,
            "offered_per_s": args.rate if args.mode == "open" else None,
            "clients": args.clients if args.mode == "closed" else None,
            "seconds": round(wall, 2),
            "sent": self.sent,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "ok_per_s": round(self.statuses.get(200, 0) / args.seconds, 1),
            "timeouts": self.timeouts,
            "errors": self.errors,
            "not_sent": self.not_sent,
            "connections": self.opened,
            "p50_ms": pct(50),
            "p90_ms": pct(90),
            "p99_ms": pct(99),
            "max_ms": round(ms[-1], 1) if ms else None,
            "cpu_s": round(cpu, 2),
            "cpu_cores": round(cpu / wall, 3),
            # with --watch PID: that process's CPU (cores) and what the rest of the machine used meanwhile
            "service_cores": round(served / wall, 3) if watch else None,
            "other_cores": round((busy - served - cpu) / wall, 3) if watch else None,
        }


async def run(args: argparse.Namespace) -> dict:
    return await Run(args).main()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--path", default="/v1/search")
    parser.add_argument("--index", default="demo")
    parser.add_argument("--mode", choices=("open", "closed"), default="open")
    parser.add_argument("--rate", type=float, default=100.0, help="open loop: arrivals per second (Poisson)")
    parser.add_argument("--clients", type=int, default=8, help="closed loop: clients")
    parser.add_argument("--honour", action="store_true", help="closed loop: wait Retry-After(-Ms) after a 429")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=5.0, help="a client timeout after this many seconds")
    parser.add_argument("--connections", type=int, default=1024, help="the most connections open at once")
    parser.add_argument("--preconnect", type=int, default=32, help="connections opened before the clock starts")
    parser.add_argument(
        "--kind",
        choices=("miss", "hit", "image"),
        default="miss",
        help="miss: every text distinct; hit: 16 texts again and again; image: photos of --images, each distinct",
    )
    parser.add_argument("--images", default="", help="--kind image: a folder of JPEG photos")
    parser.add_argument("--tag", default=str(time.time_ns()), help="makes texts distinct from other runs'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--watch", type=int, default=0, help="a process (the service) whose CPU time to report")
    args = parser.parse_args()
    if args.mode == "closed":
        args.preconnect = min(args.preconnect, args.clients)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    print(json.dumps(runner(run(args))))


if __name__ == "__main__":
    main()
