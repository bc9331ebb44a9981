"""Media by URL (service/fetch.py) through the real app and a real local HTTP server: off by default with a clear
400; when on, other schemes, credentials, hosts outside the allow-list and loopback / private / link-local addresses
are refused before anything connects; and, with the test-only XMODAL_FETCH_ALLOW_PRIVATE, a real fetch (redirects
checked hop by hop, the checked address connected to with the name kept in Host, size cap, timeouts)."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.fetch import UrlRefused, check, public_address
from service.settings import Settings
from tests.conftest import ServerThread


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (48, 48), (220, 30, 30)).save(out, format="PNG")
    return out.getvalue()


PNG = png()


class Handler(BaseHTTPRequestHandler):
    seen: list[tuple[str, str]] = []  # (path, Host header) of every request the server got

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        Handler.seen.append((self.path, self.headers.get("host", "")))
        port = self.server.server_address[1]
        if self.path == "/img.png":
            self.answer(200, PNG, {"content-type": "image/png"})
        elif self.path == "/hop":
            self.answer(302, b"", {"location": "/img.png"})
        elif self.path == "/away":  # to another name for the same server: checked again, and refused by the list
            self.answer(302, b"", {"location": f"http://localhost:{port}/img.png"})
        elif self.path == "/loop":
            self.answer(302, b"", {"location": "/loop"})
        elif self.path == "/big":
            self.answer(200, b"x" * 50_000, {"content-type": "image/png"})
        elif self.path == "/slow":
            time.sleep(3)
            self.answer(200, PNG, {"content-type": "image/png"})
        else:
            self.answer(404, b"no", {})

    def answer(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        for k, v in {**headers, "content-length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def origin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def client_with(data: Path, **settings) -> TestClient:
    return TestClient(create_app(Settings(data_dir=data, reload_interval_s=0, **settings)))


def by_url(client: TestClient, url: str):
    return client.post("/v1/search", json={"index": "demo", "query": {"image_url": url}, "k": 3})


def test_off_by_default_with_a_clear_400(served_data: Path, origin: str) -> None:
    Handler.seen.clear()
    with client_with(served_data) as c:
        r = by_url(c, f"{origin}/img.png")
        assert r.status_code == 400 and r.json()["error"]["code"] == "url_fetch_disabled"
        assert "XMODAL_FETCH_URLS" in r.json()["error"]["message"]
        knn = c.post("/knn-service", json={"image_url": f"{origin}/img.png", "indice_name": "demo", "modality": "text"})
        assert knn.status_code == 400 and knn.json()["error"]["code"] == "url_fetch_disabled"
    assert Handler.seen == []


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://example.org/x.png", "gopher://example.org/", "data:image/png;base64,AAAA", "x.png"],
)
def test_other_schemes_are_refused(served_data: Path, url: str) -> None:
    with client_with(served_data, fetch_urls=True) as c:
        r = by_url(c, url)
        assert r.status_code == 400 and r.json()["error"]["code"] == "url_refused", r.text
        assert "only http and https" in r.json()["error"]["message"]


def test_loopback_and_private_addresses_are_refused_when_fetching_is_on(served_data: Path, origin: str) -> None:
    Handler.seen.clear()
    port = origin.rsplit(":", 1)[1]
    with client_with(served_data, fetch_urls=True) as c:
        for url in (
            f"{origin}/img.png",
            f"http://localhost:{port}/img.png",
            f"http://[::1]:{port}/img.png",
            f"http://[::ffff:127.0.0.1]:{port}/img.png",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.1.2.3/x.png",
            "http://0.0.0.0/x.png",
            "http://224.0.0.1/x.png",
        ):
            r = by_url(c, url)
            assert r.status_code == 400 and r.json()["error"]["code"] == "url_refused", (url, r.text)
            assert "private, loopback" in r.json()["error"]["message"]
        r = by_url(c, f"http://user:pw@127.0.0.1:{port}/img.png")
        assert r.status_code == 400 and "credentials" in r.json()["error"]["message"] and "pw" not in r.text
    assert Handler.seen == []  # refused before connecting


def test_address_classes() -> None:
    assert public_address("93.184.215.14") and public_address("2606:2800:21f:cb07:6820:80da:af6b:8b2c")
    for address in (
        "127.0.0.1",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "::1",
        "fe80::1%eth0",
        "fc00::1",
        "::ffff:10.0.0.1",
        "0.0.0.0",
        "240.0.0.1",
        "255.255.255.255",
        "224.0.0.251",
        "ff02::1",
    ):
        assert not public_address(address), address


def test_hosts_outside_the_allow_list_are_refused() -> None:
    settings = Settings(fetch_urls=True, fetch_hosts="images.example.org, *.cdn.example.net")
    for url in ("https://example.org/x.png", "https://evil.org/images.example.org", "https://cdn.example.net/x"):
        with pytest.raises(UrlRefused, match="XMODAL_FETCH_HOSTS"):
            asyncio.run(check(url, settings))


def test_a_real_fetch_from_a_local_server(served_data: Path, origin: str) -> None:
    # XMODAL_FETCH_ALLOW_PRIVATE: unsafe, here only so that a server on loopback can be fetched at all
    port = origin.rsplit(":", 1)[1]
    with client_with(served_data, fetch_urls=True, fetch_allow_private=True, fetch_hosts="127.0.0.1") as c:
        inline = c.post(
            "/v1/search", json={"index": "demo", "query": {"image": base64.b64encode(PNG).decode()}, "k": 3}
        ).json()
        Handler.seen.clear()
        fetched = by_url(c, f"{origin}/img.png")
        assert fetched.status_code == 200, fetched.text
        assert [r["id"] for r in fetched.json()["results"]] == [r["id"] for r in inline["results"]]
        assert Handler.seen == [("/img.png", f"127.0.0.1:{port}")]
        assert by_url(c, f"{origin}/hop").status_code == 200  # a redirect to a checked URL is followed
        Handler.seen.clear()
        away = by_url(c, f"{origin}/away")  # to a host the list does not hold: refused before connecting
        assert away.status_code == 400 and "XMODAL_FETCH_HOSTS" in away.json()["error"]["message"]
        assert Handler.seen == [("/away", f"127.0.0.1:{port}")]
        assert "redirects" in by_url(c, f"{origin}/loop").json()["error"]["message"]
        Handler.seen.clear()  # a request that fails anyway fails before fetching
        nope = c.post("/v1/search", json={"index": "nope", "query": {"image_url": f"{origin}/img.png"}})
        assert nope.status_code == 404 and Handler.seen == []
        missing = by_url(c, f"{origin}/nothing.png")
        assert missing.status_code == 400 and "HTTP 404" in missing.json()["error"]["message"]
        knn = c.post("/knn-service", json={"image_url": f"{origin}/img.png", "indice_name": "demo", "modality": "text"})
        assert knn.status_code == 200 and len(knn.json()) > 0


def test_the_connection_goes_to_the_checked_address_with_the_name_as_host(served_data: Path, origin: str) -> None:
    port = origin.rsplit(":", 1)[1]
    with client_with(served_data, fetch_urls=True, fetch_allow_private=True) as c:
        Handler.seen.clear()
        assert by_url(c, f"http://localhost:{port}/img.png").status_code == 200
        assert Handler.seen == [("/img.png", f"localhost:{port}")]


def test_size_cap_and_timeouts(served_data: Path, origin: str) -> None:
    settings = {"fetch_urls": True, "fetch_allow_private": True, "max_body_bytes": 20_000, "fetch_timeout_s": 0.5}
    with client_with(served_data, **settings) as c:
        big = by_url(c, f"{origin}/big")
        assert big.status_code == 413 and big.json()["error"]["code"] == "url_media_too_large"
        t0 = time.monotonic()
        slow = by_url(c, f"{origin}/slow")
        assert slow.status_code == 400 and "time allowed" in slow.json()["error"]["message"]
        assert time.monotonic() - t0 < 2.5


def test_https_sends_the_name_as_sni_and_verifies_the_certificate(served_data: Path, tmp_path: Path) -> None:
    """The connection goes to the checked address, but TLS is the name's: its SNI, and its certificate checked (a
    self-signed one fails)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    names: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda _sock, name, _ctx: names.append(name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with client_with(served_data, fetch_urls=True, fetch_allow_private=True) as c:
            r = by_url(c, f"https://localhost:{server.server_address[1]}/img.png")
    finally:
        server.shutdown()
    assert r.status_code == 400 and r.json()["error"]["code"] == "url_fetch_failed", r.text
    assert "CERTIFICATE_VERIFY_FAILED" in r.json()["error"]["message"]
    assert names and set(names) == {"localhost"}  # not "127.0.0.1": the checked address is only where to connect


def test_fetches_count_as_searches_in_flight(served_data: Path, origin: str) -> None:
    settings = Settings(
        data_dir=served_data, reload_interval_s=0, fetch_urls=True, fetch_allow_private=True, max_inflight=1
    )
    with ServerThread(settings) as server, ThreadPoolExecutor(1) as pool:
        body = {"index": "demo", "query": {"image_url": f"{origin}/slow"}, "k": 3}
        slow = pool.submit(httpx.post, f"{server.url}/v1/search", json=body, timeout=30)
        time.sleep(1.0)  # the fetch is waiting for the slow server
        other = httpx.post(f"{server.url}/v1/search", json={"index": "demo", "query": {"text": "a comet"}}, timeout=30)
        assert other.status_code == 429 and other.headers["retry-after"]
        assert slow.result().status_code == 200
