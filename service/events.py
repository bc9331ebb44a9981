"""Version announcements on a Redis channel, so every replica swaps to a newly published index version at
once (each replica also polls CURRENT, so a missed message or a Redis outage only delays the swap)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)
CHANNEL = "xmodal:published"


def announce(redis_url: str, index: str, version: str) -> int | None:
    """Publish ``{index, version}``; the number of listening replicas, or None when Redis is unreachable
    (the publication itself is already done on disk: this never fails it)."""
    import redis

    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
        return int(client.publish(CHANNEL, json.dumps({"index": index, "version": version})))
    except redis.RedisError as exc:
        log.warning("could not announce %s %s on Redis (%s); replicas will find it by polling", index, version, exc)
        return None


def announce_published(redis_url: str | None, index: str, version: str) -> int | None:
    """What the CLI, the HTTP routes and job workers call after publishing: announce when there is a Redis
    (replicas also poll CURRENT, so this only makes the swap faster). The listeners told, or None."""
    return announce(redis_url, index, version) if redis_url else None


async def listen(redis_url: str, on_publish: Callable[[dict], Awaitable[None]], retry_s: float = 2.0) -> None:
    """Call ``on_publish`` for every announcement, reconnecting after Redis errors, until cancelled."""
    import redis.asyncio as aioredis

    while True:
        client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=1)
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        try:
                            await on_publish(json.loads(message["data"]))
                        except Exception:  # a bad message or a failed refresh must not stop the listener
                            log.exception("handling announcement %r failed", message.get("data"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis down or gone: wait, then subscribe again
            log.warning("announcement listener: %s; retrying in %.0f s", exc, retry_s)
            await asyncio.sleep(retry_s)
        finally:
            await client.aclose()
