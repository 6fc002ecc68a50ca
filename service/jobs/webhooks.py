"""Webhooks: when a job ends, its status is POSTed to the URL the job gave, signed, retried with backoff, and only
to hosts the operator allowed (off by default: the server makes no requests to addresses a client chooses).

Signature (as Stripe and Svix do): headers `Dualrate-Timestamp: <unix seconds>` and
`Dualrate-Signature: v1=<hex HMAC-SHA256(DUALRATE_WEBHOOK_SECRET, "<timestamp>.<body>")>`. A receiver recomputes it
over the raw body, compares in constant time (`verify`), and refuses a timestamp older than a few minutes (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

log = logging.getLogger("service.jobs")
TIMESTAMP_HEADER, SIGNATURE_HEADER = "Dualrate-Timestamp", "Dualrate-Signature"
TIMEOUT_S = 10.0


def signature(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, header: str, tolerance_s: float = 300.0,
           now: float | None = None) -> bool:
    """A receiver's check: the signature matches the body and the timestamp is recent."""
    now = time.time() if now is None else now
    try:
        fresh = abs(now - int(timestamp)) <= tolerance_s
    except ValueError:
        return False
    return fresh and hmac.compare_digest(signature(secret, timestamp, body), header)


def host_allowed(url: str, allow: list[str]) -> bool:
    """`url` is http(s) and its host (or host:port) is in `allow` (exact names; `*.example.com` for subdomains)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    host = parts.hostname.lower()
    hostport = f"{host}:{parts.port}" if parts.port else host
    for entry in (a.strip().lower() for a in allow if a.strip()):
        if entry in (host, hostport) or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


class Webhooks:
    def __init__(self, secret: str | None, attempts: int, allow: list[str] | None = None) -> None:
        self.secret, self.attempts, self.allow = secret or "", attempts, allow or []

    @property
    def enabled(self) -> bool:
        return bool(self.secret and self.allow)

    @staticmethod
    def backoff(attempt: int) -> float:
        """Seconds before the next attempt after `attempt` failed ones: 1, 2, 4, ... at most 300."""
        return float(min(300, 2 ** (attempt - 1)))

    async def deliver(self, url: str, status: dict[str, Any]) -> str:
        """One attempt. -> "delivered" (2xx), "failed" (another status, or no answer: retried), "refused" (the host
        is not allowed: never retried)."""
        if self.allow and not host_allowed(url, self.allow):
            return "refused"
        body = json.dumps(status, separators=(",", ":")).encode()
        ts = str(int(time.time()))
        headers = {"content-type": "application/json", TIMESTAMP_HEADER: ts,
                   SIGNATURE_HEADER: signature(self.secret, ts, body)}
        try:
            async with httpx.AsyncClient(timeout=TIMEOUT_S, follow_redirects=False, trust_env=False) as c:
                r = await c.post(url, content=body, headers=headers)
        except httpx.HTTPError as e:
            log.info("webhook to %s: %s", url, e.__class__.__name__)
            return "failed"
        return "delivered" if 200 <= r.status_code < 300 else "failed"
