"""The Redis connection of the API and the workers, and the check that it answers."""

from __future__ import annotations

import logging

import redis

from recalib import defaults
from recalib.errors import ServiceUnavailableError
from recalib.settings import Settings

logger = logging.getLogger(__name__)


def redis_url(settings: Settings) -> str:
    """``settings.redis_url``, or the documented default (``defaults.REDIS_URL``) when unset."""
    return settings.redis_url or defaults.REDIS_URL


def connect_redis(settings: Settings) -> redis.Redis:
    """A Redis client for the configured URL (connects lazily, on first use); logs the URL."""
    url = redis_url(settings)
    source = "RECALIB_REDIS_URL" if settings.redis_url else "default; RECALIB_REDIS_URL is unset"
    logger.info("Redis at %s (%s)", _without_password(url), source)
    return redis.Redis.from_url(
        url, socket_timeout=5.0, socket_connect_timeout=2.0, health_check_interval=30
    )


def require_redis(conn: redis.Redis, settings: Settings) -> None:
    """Fail fast, in one line, when Redis does not answer (a worker must not wait silently)."""
    try:
        conn.ping()
    except redis.RedisError as exc:
        url = _without_password(redis_url(settings))
        hint = "" if settings.redis_url else " (RECALIB_REDIS_URL is unset: the default was used)"
        raise ServiceUnavailableError(
            f"Redis at {url} does not answer ({exc}){hint}; start it or set RECALIB_REDIS_URL",
            field="RECALIB_REDIS_URL",
        ) from exc


def _without_password(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to log)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"
