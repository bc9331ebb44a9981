"""Micro-batching and the decoding memory budget, against the real app over HTTP (uvicorn in a thread) and the real
ONNX encoder: concurrent queries share batches and get exactly what they would alone, a full queue is a 429 with
Retry-After, a bad input fails alone (refused at decoding, or raised by the ONNX run in a shared batch), an expired
deadline is dropped unencoded, and a small file that would decode into hundreds of megabytes is refused or waits
without the process growing past the budget."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import re
import shutil
import socket
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from models.encoder import Encoder
from models.errors import InvalidInput
from service.batcher import MicroBatcher
from service.budget import MB, MemoryBudget
from service.errors import DeadlineExceeded, InputTooLarge, Overloaded
from service.metrics import BatchMetrics
from service.settings import Settings
from tests.conftest import ServerThread
from tests.service.log_records import Records

TEXTS = [
    "a dog",
    "a violinist plays on a crowded street corner at dusk",
    "rain",
    "waves crash against the rocks below the old lighthouse while gulls circle overhead in the wind",
    "a red car",
    "children laughing in a park",
    "thunder rolls over the hills and the first heavy drops of rain begin to fall on the dry fields",
    "a cat sleeps",
]


def server(data: Path, **overrides) -> ServerThread:
    """The real app; admission a fixed limit (XMODAL_QUEUE_TARGET_MS=0) unless told otherwise: these tests send
    bursts to see them batched, and adaptive admission may shed part of a burst that meets a slow first batch
    (test_admission.py tests that)."""
    return ServerThread(Settings(data_dir=data, reload_interval_s=0, **({"queue_target_ms": 0} | overrides)))


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    text = client.get("/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(part in (m.group(1) or "") for part in want.split(",") if part):
            return float(m.group(2))
    return 0.0


def long_texts(n: int) -> list[str]:
    """Texts of ~190 tokens: slow enough to encode that queries behind them wait."""
    return [f"the quick brown fox {i} jumps over the lazy dog near the river bank at dawn " * 12 for i in range(n)]


def dropped(client: httpx.Client, reason: str) -> float:
    return metric(client, "xmodal_batch_dropped_total", lane="text", reason=reason)


def wait_for(condition: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def at_once(n: int, call: Callable[[int], httpx.Response]) -> list[httpx.Response]:
    """``n`` requests released together, each on its own thread."""
    barrier = threading.Barrier(n)

    def one(i: int) -> httpx.Response:
        barrier.wait()
        return call(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def pictures(n: int) -> list[bytes]:
    rng = np.random.default_rng(7)
    sizes = [(40, 30), (64, 64), (200, 90), (31, 77), (128, 128), (90, 300), (50, 50), (256, 20)]
    return [png(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))) for w, h in (sizes * 4)[:n]]


def embed_as_alone(client: httpx.Client, encoder: Encoder, modality: str, files: list[bytes]) -> None:
    """One /v1/embeddings request of ``files`` through the lane: each vector what the file gets encoded alone."""
    before = metric(client, "xmodal_batch_size_sum", lane=modality)
    r = client.post("/v1/embeddings", json={"input": [b64(f) for f in files], "modality": modality})
    assert r.status_code == 200, r.text
    for data, item in zip(files, r.json()["data"], strict=True):
        single = encoder.encode_media(modality, [encoder.decode(modality, data)])[0]
        np.testing.assert_allclose(item["embedding"], single, atol=2e-5)
    assert metric(client, "xmodal_batch_size_sum", lane=modality) == before + len(files)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def model_label(encoder: Encoder) -> str:
    """The batch metrics' model label: two models' lanes stay apart."""
    return f"{encoder.name}@{encoder.fingerprint[:12]}"


# --- batches equal single encodes -------------------------------------------------------------------------------------
def test_concurrent_queries_share_batches_and_equal_single_encodes(served_data: Path, encoder: Encoder) -> None:
    with server(served_data, batch_wait_ms=100) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        # one request's inputs: one batch, texts of different lengths padded together
        r = c.post("/v1/embeddings", json={"input": TEXTS})
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        alone = np.stack([encoder.encode_text([t])[0] for t in TEXTS])
        np.testing.assert_allclose(got, alone, atol=2e-5)
        assert metric(c, "xmodal_batch_size_count", lane="text") == 1
        assert metric(c, "xmodal_batch_size_sum", lane="text") == len(TEXTS)

        # separate requests at once: they meet in the queue
        texts = [f"{t} number {i}" for i, t in enumerate(TEXTS * 2)]
        found = at_once(len(texts), lambda i: c.post("/v1/embeddings", json={"input": texts[i]}))
        assert [f.status_code for f in found] == [200] * len(texts)
        batches = metric(c, "xmodal_batch_size_count", lane="text") - 1
        assert batches < len(texts), "no two requests shared a batch"
        for text, f in zip(texts, found, strict=True):
            np.testing.assert_allclose(f.json()["data"][0]["embedding"], encoder.encode_text([text])[0], atol=2e-5)

        # token vectors (late interaction) go through their own lane, and equal single encodes too
        r = c.post("/v1/embeddings", json={"input": TEXTS[:4], "tokens": True})
        assert r.status_code == 200, r.text
        for text, item in zip(TEXTS[:4], r.json()["data"], strict=True):
            single = encoder.encode_text_tokens([text])
            np.testing.assert_allclose(item["tokens"], single.tokens[0], atol=2e-5)
        assert metric(c, "xmodal_batch_size_sum", lane="text+tokens") == 4

        # images of different sizes: decoded first, then one batch of fixed-size tensors
        embed_as_alone(c, encoder, "image", pictures(6))
        for name in ("xmodal_batch_queue_seconds_count", "xmodal_batch_encode_seconds_count"):
            assert metric(c, name, lane="image") >= 1


def sound(seconds: float, rate: int, channels: int = 1, fmt: str = "WAV", seed: int = 0) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (220 + 110 * seed) * t) + 0.01 * np.random.default_rng(seed).standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, np.repeat(wave[:, None], channels, axis=1).astype(np.float32), rate, format=fmt)
    return buf.getvalue()


def test_sounds_of_different_lengths_are_batched_and_budgeted(served_data: Path, encoder: Encoder) -> None:
    sounds = [sound(s, 16000, seed=i) for i, s in enumerate((0.4, 1.3, 2.0, 3.1))]  # the clip is 2 s: pad, cut
    with server(served_data, decode_memory_mb=16) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        embed_as_alone(c, encoder, "audio", sounds)
        # a minute of 48 kHz stereo (a small FLAC): about 37 MB to decode and resample, judged from its header
        minute = sound(60, 48000, channels=2, fmt="FLAC")
        r = c.post("/v1/search", json={"index": "demo", "query": {"audio": b64(minute)}})
        assert r.status_code == 413 and r.json()["error"]["code"] == "input_too_large", r.text
        decoded = metric(c, "xmodal_search_stage_seconds_count", stage="decode", index="-", modality="audio")
        assert decoded == 4  # the minute was never decoded


def test_batched_searches_rank_as_unbatched_ones(served_data: Path) -> None:
    queries = [f"{t} {i}" for i, t in enumerate(TEXTS)]

    def ranked(srv: ServerThread, together: bool) -> list[list[tuple[str, float]]]:
        with httpx.Client(base_url=srv.url, timeout=60) as c:

            def one(i: int) -> httpx.Response:
                return c.post("/v1/search", json={"index": "demo", "query": {"text": queries[i]}, "k": 5})

            found = at_once(len(queries), one) if together else [one(i) for i in range(len(queries))]
            assert [f.status_code for f in found] == [200] * len(queries)
            return [[(h["id"], h["score"]) for h in f.json()["results"]] for f in found]

    with server(served_data, batch_max=1) as srv:
        alone = ranked(srv, together=False)
    with server(served_data, batch_wait_ms=100) as srv:
        batched = ranked(srv, together=True)
        with httpx.Client(base_url=srv.url) as c:
            assert metric(c, "xmodal_batch_size_count", lane="text") < len(queries)
    for a, b in zip(alone, batched, strict=True):
        assert [i for i, _ in a] == [i for i, _ in b]
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], atol=1e-5)


# --- overload, failures, deadlines ------------------------------------------------------------------------------------
def test_a_full_queue_is_429_with_retry_after(served_data: Path) -> None:
    # admission fixed (its own 429s are tested in test_admission.py): here every request reaches the queue
    settings = {"batch_queue": 4, "batch_max": 1, "batch_wait_ms": 0, "queue_target_ms": 0}
    with server(served_data, **settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        # a request's inputs join the queue all together or not at all
        r = c.post("/v1/embeddings", json={"input": TEXTS[:5]})
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["code"] == "overloaded" and "waiting" in r.json()["error"]["message"]
        assert metric(c, "xmodal_batch_rejected_total", lane="text") == 5
        long = " ".join(TEXTS)
        found = at_once(24, lambda i: c.post("/v1/embeddings", json={"input": [f"{long} {i} {j}" for j in range(3)]}))
        codes = sorted({f.status_code for f in found})
        assert set(codes) <= {200, 429} and 429 in codes, codes
        assert all(f.headers["retry-after"] == "1" for f in found if f.status_code == 429)
        assert c.post("/v1/embeddings", json={"input": TEXTS[:4]}).status_code == 200  # the lane still runs


def test_a_bad_image_among_good_ones_fails_alone(served_data: Path, encoder: Encoder) -> None:
    good = pictures(7)
    broken = good[1][: len(good[1]) // 2]  # a real PNG header, then the data stops
    files = [*good[:3], broken, *good[3:]]
    with server(served_data, batch_wait_ms=100) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:

        def one(i: int) -> httpx.Response:
            return c.post("/v1/search", json={"index": "demo", "query": {"image": b64(files[i])}, "k": 3})

        found = at_once(len(files), one)
        assert found[3].status_code == 400 and "truncated" in found[3].json()["error"]["message"]
        assert [f.status_code for i, f in enumerate(found) if i != 3] == [200] * len(good)
        assert metric(c, "xmodal_batch_size_sum", lane="image") == len(good)  # the broken one never joined
        assert metric(c, "xmodal_batch_size_count", lane="image") < len(good)


def test_a_batch_the_encoder_refuses_fails_only_the_input_at_fault(encoder: Encoder) -> None:
    """The real encoder raising for one input of a batch (a blank text): that query gets the error, the others
    their vectors, and the lane keeps serving."""
    registry = CollectorRegistry()
    metrics = BatchMetrics(registry)

    async def go() -> list:
        batcher = MicroBatcher(encoder, Settings(batch_wait_ms=50), metrics)
        deadline = time.monotonic() + 30
        texts = ["a dog", "   ", "a violinist plays on a crowded street corner"]
        out = await asyncio.gather(
            *(batcher.encode("text", False, [t], deadline) for t in texts), return_exceptions=True
        )
        out.append(await batcher.encode("text", False, ["rain"], deadline))
        batcher.close()
        return out

    dog, blank, violin, rain = asyncio.run(go())
    assert isinstance(blank, InvalidInput) and "empty" in blank.message
    for text, got in (("a dog", dog), ("a violinist plays on a crowded street corner", violin), ("rain", rain)):
        np.testing.assert_allclose(got[0], encoder.encode_text([text])[0], atol=2e-5)
    lane = {"model": model_label(encoder), "lane": "text"}
    assert registry.get_sample_value("xmodal_batch_failed_total", lane) == 1
    assert registry.get_sample_value("xmodal_batch_size_sum", lane) == 3 + 1  # the batch, then rain


def with_token_past_the_embedding_table(models_dir: Path, data: Path) -> Encoder:
    """A data folder whose xmodal-mini has one word more in its tokenizer than rows in its text tower's embedding
    table (a tokenizer and a graph that do not match, as a botched export would pair them): the ONNX run raises on
    any text holding ``[BOOM]`` and on nothing else. The graph, the rest of the tokenizer and the runtime are the
    real ones; the bundle is fingerprinted afresh, so the service loads it as any other."""
    from tokenizers import AddedToken, Tokenizer

    from models.bundle import DEFAULT_MODEL, MANIFEST, compute_fingerprint, load_manifest
    from models.files import atomic_write_json

    bundle = data / "models" / DEFAULT_MODEL
    shutil.copytree(models_dir / DEFAULT_MODEL, bundle)
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    rows = tokenizer.get_vocab_size()
    tokenizer.add_tokens([AddedToken("[BOOM]", single_word=True)])
    assert tokenizer.token_to_id("[BOOM]") == rows  # one past the table's last row
    tokenizer.save(str(bundle / "tokenizer.json"))
    manifest = load_manifest(bundle)
    fingerprint = compute_fingerprint(bundle, manifest.towers)
    atomic_write_json(bundle / MANIFEST, manifest.model_copy(update={"fingerprint": fingerprint}).model_dump())
    return Encoder(bundle, device="cpu")


def test_an_input_the_real_encoder_refuses_fails_alone_in_its_shared_batch(models_dir: Path, tmp_path: Path) -> None:
    """Over HTTP, concurrent requests meet in one batch; the ONNX run raises for one of them (no input this service
    lets through makes the shipped model raise: validation checks what the encoder checks, and decoding already ran
    every step preprocessing repeats; so its tokenizer knows a word its graph cannot embed). Only that request
    fails, the others get the vectors they would get alone, and the lane keeps serving."""
    encoder = with_token_past_the_embedding_table(models_dir, tmp_path)
    texts = ["a dog", "rain on a tin roof", "a [BOOM] in the text", "a violinist", "waves at night", "a red car"]
    bad = 2
    with (
        Records() as logs,
        server(tmp_path, batch_wait_ms=2000) as srv,
        httpx.Client(base_url=srv.url, timeout=60) as c,
    ):
        found = at_once(
            len(texts),
            lambda i: c.post("/v1/embeddings", json={"input": texts[i]}, headers={"X-Request-ID": f"req-{i}"}),
        )
        assert found[bad].status_code == 500 and found[bad].json()["error"]["code"] == "internal_error"
        assert "InvalidArgument" in found[bad].json()["error"]["message"]
        for i, f in enumerate(found):
            if i != bad:
                assert f.status_code == 200, f.text
                np.testing.assert_allclose(
                    f.json()["data"][0]["embedding"], encoder.encode_text([texts[i]])[0], atol=2e-5
                )
        # one batch of all six, which raised; then each alone
        assert metric(c, "xmodal_batch_size_count", lane="text") == 1
        assert metric(c, "xmodal_batch_size_sum", lane="text") == len(texts)
        assert metric(c, "xmodal_batch_failed_total", lane="text") == 1
        assert c.post("/v1/embeddings", json={"input": "still served"}).status_code == 200
    # the lane says which requests its failed batch held, under no request id of its own
    (warning,) = [r for r in logs.of("service.batcher") if r.levelno == logging.WARNING]
    assert "InvalidArgument" in warning.getMessage() and warning.request_id is None
    assert warning.request_ids == sorted(f"req-{i}" for i in range(len(texts)))
    (failed,) = [r for r in logs.of("service.errors") if r.exc_info]
    assert failed.request_id == f"req-{bad}"


def test_a_lane_holds_no_decoded_file_once_it_is_encoded(encoder: Encoder) -> None:
    """When a query leaves (its decoding memory is lent again), the lane keeps no reference to its decoded file: the
    file is freed with its caller's last one, not when the next batch forms (until then it lived on beside the next
    decode: 16 8000x8000 PNGs at once raised RSS by 627 MB over a 512 MB budget)."""

    async def go() -> list[bool]:
        batcher = MicroBatcher(encoder, Settings(), BatchMetrics(CollectorRegistry()))
        image = encoder.decode("image", pictures(1)[0])
        alive = weakref.ref(image)
        await batcher.encode("image", False, [image], time.monotonic() + 30)
        del image
        await asyncio.sleep(0.05)  # the lane is back to waiting for its next batch
        freed = [alive() is None]
        batcher.close()
        return freed

    assert asyncio.run(go()) == [True]


def test_expired_and_cancelled_queries_are_dropped_unencoded(served_data: Path, encoder: Encoder) -> None:
    # over HTTP: 256 long texts in batches of 8, and 0.2 s to encode them: most wait in the queue past their deadline
    settings = {"request_timeout_s": 0.2, "batch_max": 8}
    with server(served_data, **settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/embeddings", json={"input": long_texts(256)})
        assert r.status_code == 503 and r.json()["error"]["code"] == "deadline_exceeded", r.text
        assert r.headers["retry-after"] == "1"
        wait_for(lambda: metric(c, "xmodal_batch_size_sum", lane="text") + dropped(c, "deadline") == 256)
        assert dropped(c, "deadline") > 0  # dropped unencoded: the encoded and the dropped make up the request
        assert c.post("/v1/embeddings", json={"input": "on time"}).status_code == 200

    # a client gone: its task cancelled while queued, its query leaves unencoded (below over HTTP)
    registry = CollectorRegistry()
    metrics = BatchMetrics(registry)

    async def go() -> None:
        batcher = MicroBatcher(encoder, Settings(batch_wait_ms=100), metrics)
        deadline = time.monotonic() + 30
        gone = asyncio.ensure_future(batcher.encode("text", False, ["never encoded"], deadline))
        await asyncio.sleep(0)
        stays = asyncio.ensure_future(batcher.encode("text", False, ["encoded"], deadline))
        await asyncio.sleep(0.01)
        gone.cancel()
        assert len((await stays)[0]) == encoder.dim
        with pytest.raises(asyncio.CancelledError):
            await gone
        with pytest.raises(DeadlineExceeded):  # a deadline already past: never queued for long
            await batcher.encode("text", False, ["too late"], time.monotonic() - 1)
        batcher.close()

    asyncio.run(go())
    lane = {"model": model_label(encoder), "lane": "text"}
    assert registry.get_sample_value("xmodal_batch_dropped_total", {**lane, "reason": "cancelled"}) == 1
    assert registry.get_sample_value("xmodal_batch_size_sum", lane) == 1  # only "encoded" was


def test_a_client_that_hangs_up_leaves_the_queue_unencoded(served_data: Path) -> None:
    body = json.dumps({"index": "demo", "query": {"text": "nobody waits for this answer"}}).encode()
    head = f"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    with server(served_data, batch_max=8) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        with ThreadPoolExecutor(1) as pool:
            ahead = pool.submit(c.post, "/v1/embeddings", json={"input": long_texts(32)})  # 4 batches ahead of it
            wait_for(lambda: metric(c, "xmodal_batch_size_count", lane="text") >= 1)
            with socket.create_connection(("127.0.0.1", srv.port)) as raw:
                raw.sendall(head.encode() + b"\r\n" + body)
                time.sleep(0.1)  # queued behind the long texts
            assert ahead.result().status_code == 200
        wait_for(lambda: dropped(c, "cancelled") == 1)
        assert metric(c, "xmodal_batch_size_sum", lane="text") == 32  # the long texts only
        assert metric(c, "xmodal_http_requests_total", path="/v1/search", status="499") == 1
        assert c.post("/v1/search", json={"index": "demo", "query": {"text": "still served"}}).status_code == 200


# --- decoding memory --------------------------------------------------------------------------------------------------
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_growth(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, int]:
    """The call's response and how far this process's RSS rose above where it started, sampled every ms."""
    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    try:
        r = call()
    finally:
        done.set()
        t.join()
    return r, max(peak[0], rss()) - base


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def tagged(png_bytes: bytes, tag: str) -> bytes:
    """The same picture in other bytes (a tEXt chunk after IHDR), so the embedding cache cannot answer for it."""
    ihdr_end = 8 + 8 + 13 + 4
    return png_bytes[:ihdr_end] + chunk(b"tEXt", b"Comment\0" + tag.encode()) + png_bytes[ihdr_end:]


def tall_png(width: int, height: int) -> bytes:
    """A 1-bit grey PNG of zeros, written chunk by chunk: Pillow itself would take minutes (and gigabytes) for it."""
    row = b"\0" * (1 + (width + 7) // 8)
    z, parts, rows = zlib.compressobj(9), [], 1 << 16
    for start in range(0, height, rows):
        parts.append(z.compress(row * min(rows, height - start)))
    parts.append(z.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def test_the_budget_refuses_waits_and_outlives_a_cancelled_decode(encoder: Encoder) -> None:
    bomb = png(Image.new("1", (8000, 8000)))

    async def go() -> None:
        budget = MemoryBudget(400 * MB, wait_s=0.2)
        with pytest.raises(InputTooLarge):
            async with budget.reserve(401 * MB, "this image"):
                pass
        async with budget.reserve(300 * MB, "one"):
            t0 = time.monotonic()
            with pytest.raises(Overloaded):
                async with budget.reserve(200 * MB, "another"):
                    pass
            assert time.monotonic() - t0 >= 0.2
        assert budget.used == 0
        # cancelled while its decode runs: the thread still holds the memory, so the bytes stay reserved until it ends
        loop = asyncio.get_running_loop()
        cost = encoder.decode_cost("image", bomb)

        async def decode() -> None:
            async with budget.reserve(cost.peak, "the bomb") as reservation:
                await reservation.hold_while(loop.run_in_executor(None, encoder.decode, "image", bomb))

        task = asyncio.ensure_future(decode())
        await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.sleep(0)
        assert task.cancelled() and budget.used == cost.peak
        while budget.used:
            await asyncio.sleep(0.01)

    asyncio.run(go())


def test_decoding_memory_is_budgeted(served_data: Path) -> None:
    bomb = png(Image.new("1", (8000, 8000)))  # ~8 KB that decode into ~330 MB
    assert len(bomb) < 10_000
    tall = tall_png(1, 64_000_000)  # ~120 KB: 64 M rows
    budget = 128
    with server(served_data, decode_memory_mb=budget) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        r, grew = peak_growth(lambda: c.post("/v1/search", json={"index": "demo", "query": {"image": b64(bomb)}}))
        assert r.status_code == 413 and r.json()["error"]["code"] == "input_too_large", r.text
        assert "XMODAL_DECODE_MEMORY_MB" in r.json()["error"]["message"]
        assert grew < budget << 20, grew
        r, grew = peak_growth(lambda: c.post("/v1/embeddings", json={"input": [b64(tall)], "modality": "image"}))
        # refused from its header: by the budget here (this model squashes to a square), by the pixel limit on
        # what resizing would make of it for a model that keeps the aspect ratio
        assert r.status_code == 413 and r.json()["error"]["details"]["needed_bytes"] > 1 << 30, r.text
        assert grew < budget << 20, grew

    budget = 512  # the default: one such picture at a time fits
    with server(served_data, decode_wait_s=0.5) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        r, grew = peak_growth(lambda: c.post("/v1/embeddings", json={"input": [b64(bomb)], "modality": "image"}))
        assert r.status_code == 200, r.text
        assert grew < budget << 20, grew
        # 32 of them in one request (260 KB): decoded one after another within the budget, or refused
        many = {"input": [b64(tagged(bomb, str(i))) for i in range(32)], "modality": "image"}
        r, grew = peak_growth(lambda: c.post("/v1/embeddings", json=many))
        assert r.status_code in (200, 429), r.text
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and "memory lent to decoding is busy" in r.json()["error"]["message"]
        assert grew < budget << 20, grew
        # a refused request's other pictures may still be decoding: the storm meets an idle service
        wait_for(lambda: metric(c, "xmodal_decode_memory_bytes") == 0, 10)
        # 16 requests at once, each its own such picture (the 6.3 GB and a 6.4 s /healthz): one at a time
        storm = [{"index": "demo", "query": {"image": b64(tagged(bomb, f"storm {i}"))}} for i in range(16)]
        slowest, stop = [0.0], threading.Event()

        def probe() -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as h:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    assert h.get("/healthz").status_code == 200
                    slowest[0] = max(slowest[0], time.perf_counter() - t0)
                    time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            found, grew = peak_growth(lambda: at_once(16, lambda i: c.post("/v1/search", json=storm[i])))
        finally:
            stop.set()
            prober.join()
        codes = [f.status_code for f in found]
        assert set(codes) <= {200, 429} and 200 in codes, [(f.status_code, f.text[:150]) for f in found]
        assert grew < budget << 20, grew
        assert slowest[0] < 2.0, slowest  # the event loop never decodes
        wait_for(lambda: metric(c, "xmodal_decode_memory_bytes") == 0, 10)  # all given back, once decodes end
        assert c.get("/healthz").status_code == 200
