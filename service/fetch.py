"""Media fetched by URL (``query.image_url`` in /v1/search, ``image_url`` in /knn-service): off unless
XMODAL_FETCH_URLS=true, because a service that fetches what a request names can be made to reach what only it can
reach (SSRF: cloud metadata at 169.254.169.254, Redis on localhost, the private network).

When on, every URL (the first and each redirect's) is checked before anything connects: http or https only, no
credentials in it, its host in XMODAL_FETCH_HOSTS when that is set, and every address its name resolves to public
(not private, loopback, link-local, multicast, reserved or unspecified). The connection then goes to the address
that was checked, not to the name again, so a DNS answer that changes between the check and the connect (DNS
rebinding) cannot swap in another address; the name still goes in the Host header and, for https, in SNI and the
certificate check. Redirects are followed by hand (a few, each checked the same way); connect and read timeouts, an
overall deadline and a size cap (XMODAL_MAX_BODY_BYTES, decoded bytes) bound what one fetch can cost.

XMODAL_FETCH_ALLOW_PRIVATE=true skips the address check: unsafe, for tests against a local server only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import socket
from dataclasses import dataclass

import httpx

from models.errors import InvalidInput
from service.errors import ResponseTooLarge
from service.schemas import SearchRequest
from service.settings import Settings, comma_list
from service.state import ServiceState

MAX_REDIRECTS = 3
ACCEPT = "image/*, audio/*;q=0.9, */*;q=0.1"


class FetchDisabled(InvalidInput):
    code = "url_fetch_disabled"


class UrlRefused(InvalidInput):
    """The URL is not one this service fetches (scheme, host, address)."""

    code = "url_refused"


class FetchFailed(InvalidInput):
    """The URL was allowed but its server did not give a file (error status, timeout, unreachable)."""

    code = "url_fetch_failed"


class FetchedTooLarge(ResponseTooLarge):
    code = "url_media_too_large"


@dataclass(frozen=True)
class Target:
    """A checked URL: the name it holds (ASCII) and the addresses to connect to, in the resolver's order."""

    url: httpx.URL
    host: str
    addresses: tuple[str, ...]


def public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 link-local address may carry a %scope
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    bad = ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
    return ip.is_global and not bad and not ip.is_unspecified


def host_allowed(host: str, allowed: list[str]) -> bool:
    """Exact names, or ``*.example.org`` for its subdomains (not example.org itself)."""
    host = host.lower().rstrip(".")
    for entry in (a.lower().rstrip(".") for a in allowed):
        if host == entry or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


async def resolve(host: str, port: int) -> list[str]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise FetchFailed(f"image_url: the host {host!r} does not resolve") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def check(url: str | httpx.URL, settings: Settings) -> Target:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise UrlRefused("image_url is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise UrlRefused(f"image_url: only http and https URLs are fetched, not {parsed.scheme or 'none'!r}")
    if parsed.userinfo:
        raise UrlRefused("image_url: URLs with credentials (user:password@) are not fetched")
    host = parsed.raw_host.decode("ascii").lower()
    if not host:
        raise UrlRefused("image_url has no host")
    allowed = comma_list(settings.fetch_hosts)
    if allowed and not (host_allowed(host, allowed) or host_allowed(parsed.host, allowed)):
        raise UrlRefused(
            f"image_url: the host {parsed.host!r} is not one this service fetches from (XMODAL_FETCH_HOSTS)"
        )
    addresses = await resolve(host, parsed.port or (443 if parsed.scheme == "https" else 80))
    if not settings.fetch_allow_private:
        refused = [a for a in addresses if not public_address(a)]
        if refused:  # any one of them would do: a name with a public and a private address is refused too
            raise UrlRefused(
                f"image_url: {parsed.host!r} resolves to {refused[0]}, a private, loopback, link-local, multicast or "
                "reserved address: not fetched"
            )
    return Target(parsed, host, tuple(addresses))


async def _get(client: httpx.AsyncClient, target: Target, cap: int) -> bytes | httpx.URL:
    """The body of ``target`` (from the first of its checked addresses that takes the connection), or the URL it
    redirects to."""
    *others, last = target.addresses
    for address in others:
        with contextlib.suppress(httpx.ConnectError):  # e.g. an IPv6 address on a host without IPv6: the next one
            return await _get_from(client, target, address, cap)
    return await _get_from(client, target, last, cap)


async def _get_from(client: httpx.AsyncClient, target: Target, address: str, cap: int) -> bytes | httpx.URL:
    headers = {"host": target.url.netloc.decode("ascii"), "accept": ACCEPT, "user-agent": "xmodal"}
    extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
    direct = target.url.copy_with(host=address)
    async with client.stream("GET", direct, headers=headers, extensions=extensions) as response:
        if response.is_redirect and "location" in response.headers:
            return target.url.join(response.headers["location"])
        if response.status_code != 200:
            raise FetchFailed(f"image_url: the server answered HTTP {response.status_code}")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise FetchedTooLarge(f"image_url: the file is {int(declared)} bytes; the limit is {cap}")
        body = bytearray()
        async for chunk in response.aiter_bytes():  # decoded bytes: a small gzip bomb counts at its real size
            body += chunk
            if len(body) > cap:
                raise FetchedTooLarge(f"image_url: the file is over the limit of {cap} bytes")
        return bytes(body)


async def fetch_media(url: str, settings: Settings) -> bytes:
    """The bytes at ``url``, fetched as the module docstring says, or a typed error (400, 413)."""
    if not settings.fetch_urls:
        raise FetchDisabled(
            "image_url: this service does not fetch URLs (XMODAL_FETCH_URLS=false): send the file itself as base64",
            param="image_url",
        )
    timeout = httpx.Timeout(settings.fetch_timeout_s)
    # trust_env=False: no HTTP(S)_PROXY from the environment, which would connect to the name, not the address
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:

        async def follow() -> bytes:
            current: str | httpx.URL = url
            for _ in range(MAX_REDIRECTS + 1):
                got = await _get(client, await check(current, settings), settings.max_body_bytes)
                if isinstance(got, bytes):
                    if not got:
                        raise FetchFailed("image_url: the file is empty")
                    return got
                current = got
            raise FetchFailed(f"image_url: more than {MAX_REDIRECTS} redirects")

        try:
            return await asyncio.wait_for(follow(), settings.fetch_deadline_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise FetchFailed(
                f"image_url: no complete answer within the time allowed ({settings.fetch_timeout_s} s "
                f"per read, {settings.fetch_deadline_s} s in all)"
            ) from None
        except httpx.HTTPError as exc:
            raise FetchFailed(f"image_url: the fetch failed ({type(exc).__name__}: {str(exc)[:200]})") from None


async def with_fetched_image(req: SearchRequest, state: ServiceState) -> SearchRequest:
    """``req`` with its ``query.image_url`` replaced by the fetched file: from there on, a base64 image query (the
    same decoding, caches and errors). Fetches count as searches in flight (XMODAL_MAX_INFLIGHT, 429 beyond), so
    the memory they hold (up to XMODAL_MAX_BODY_BYTES each) is bounded too."""
    async with state.admission.admit():
        data = await fetch_media(req.query.image_url or "", state.settings)
    query = req.query.model_copy(update={"image": base64.b64encode(data).decode(), "image_url": None})
    return req.model_copy(update={"query": query})
