"""Optional API keys and per-key rate limits (docs/design.md §9 "API keys").

With keys configured (`CVSERVE_API_KEYS`, or one per line in `CVSERVE_API_KEYS_FILE`),
every request needs `Authorization: Bearer <key>` (REST) or an `authorization` metadata
entry (gRPC), except the web page and the API docs, and /healthz, /readyz and /metrics
unless they are set protected. Each key may make `rate_limit_per_minute` requests a
minute: counted in Redis when the service uses it (so every api process shares the
count), else in this process; over it, 429 with Retry-After. Keys are compared in
constant time and never stored or logged: Redis sees a hash of each.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from pathlib import Path
from typing import Protocol

from .errors import RateLimited, Unauthorized
from .settings import Settings

log = logging.getLogger("cvserve.auth")

# Always open: the page and the docs carry no data; the api calls they make need a key.
OPEN_PREFIXES = ("/static/", "/docs", "/redoc", "/openapi.json")
OPEN_PATHS = ("/",)
HEALTH_PATHS = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")
WINDOW_S = 60


class Counter(Protocol):
    async def hit(self, key: str, window: int, ttl_s: int) -> int: ...


class MemoryCounter:
    """Fixed-window counts in this process (embedded mode: one process serves)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}

    async def hit(self, key: str, window: int, ttl_s: int) -> int:
        self.counts = {k: v for k, v in self.counts.items() if k[1] >= window}
        self.counts[(key, window)] = self.counts.get((key, window), 0) + 1
        return self.counts[(key, window)]


class RedisCounter:
    """Fixed-window counts in Redis, shared by every api process of the deployment."""

    def __init__(self, redis: object, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    async def hit(self, key: str, window: int, ttl_s: int) -> int:
        name = f"{self.prefix}:ratelimit:{key}:{window}"
        async with self.redis.pipeline(transaction=True) as pipe:  # type: ignore[attr-defined]
            pipe.incr(name)
            pipe.expire(name, ttl_s)
            count, _ = await pipe.execute()
        return int(count)


def load_keys(settings: Settings) -> list[str]:
    keys = list(settings.api_keys)
    if settings.api_keys_file is not None:
        try:
            text = Path(settings.api_keys_file).read_text()
        except OSError as exc:
            raise ValueError(f"CVSERVE_API_KEYS_FILE: cannot read {settings.api_keys_file}: "
                             f"{exc}") from exc
        keys += [ln.strip() for ln in text.splitlines()
                 if ln.strip() and not ln.lstrip().startswith("#")]
    return keys


class Guard:
    """Decides whether a request may go on: its key, and its key's rate."""

    def __init__(self, settings: Settings, counter: Counter | None = None) -> None:
        self.settings = settings
        self.keys = [k.encode() for k in load_keys(settings)]
        self.counter = counter or MemoryCounter()

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def open(self, path: str) -> bool:
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return True
        if path in HEALTH_PATHS:
            return not self.settings.protect_health
        if path == "/metrics":
            return not self.settings.protect_metrics
        return False

    async def check(self, path: str, authorization: str | None) -> None:
        """Raises Unauthorized (401) or RateLimited (429)."""
        if not self.enabled or self.open(path):
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("this service needs an API key: send `Authorization: Bearer "
                               "<key>`")
        given = token.strip().encode()
        # Every configured key compared, in constant time: no early exit to time.
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise Unauthorized("the API key is not valid")
        limit = self.settings.rate_limit_per_minute
        if limit:
            now = time.time()
            window = int(now // WINDOW_S)
            digest = hashlib.sha256(given).hexdigest()[:16]
            try:
                count = await self.counter.hit(digest, window, 2 * WINDOW_S)
            except Exception as exc:  # Redis away: the request is not refused for that
                log.warning("rate limit not counted: %s", exc)
                return
            if count > limit:
                wait = max(1, math.ceil((window + 1) * WINDOW_S - now))
                raise RateLimited(f"over this key's {limit} requests a minute "
                                  "(CVSERVE_RATE_LIMIT_PER_MINUTE); retry after the window",
                                  retry_after_s=wait)
