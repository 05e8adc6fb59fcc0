"""The manager's per-keypair rate limit, as ``manager/api/ratelimit.py`` applies it.

Every authorised request enters the keypair's rolling window before the
limit is checked (the manager's Lua script does ZADD, then ZCARD), so the
requests a 429 refuses count as well, and a client that keeps retrying
keeps itself locked out. A refusal carries no ``Retry-After`` and no
``X-RateLimit-*`` headers; an answered request carries ``X-RateLimit-Limit``,
``X-RateLimit-Remaining`` (the limit minus the requests in the window) and
``X-RateLimit-Window`` (its length in seconds). Checked at 23.09.11 and
26.8.1; the default limit of a keypair an administrator makes is 10,000
requests per 900 s.

Invariants: the window only ever holds the last ``window`` seconds of one
keypair's requests; nothing here sleeps or blocks.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

from .problems import Problem

#: The manager's window and the default limit of a keypair an administrator creates.
DEFAULT_WINDOW = 900.0
DEFAULT_REQUESTS = 10_000


class RateLimitSyntax(ValueError):
    """A ``--rate-limit`` that is not ``N/SECONDS``."""


@dataclass
class RateLimit:
    requests: int
    window: float
    _seen: dict[str, deque[float]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """``N/SECONDS`` (``5000/900``); `RateLimitSyntax` otherwise."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*s?\s*", text)
        if match is None or int(match.group(1)) < 1 or float(match.group(2)) <= 0:
            raise RateLimitSyntax(f"a rate limit is N/SECONDS with N >= 1 (such as 5000/900), not {text!r}")
        return cls(int(match.group(1)), float(match.group(2)))

    def admit(self, access_key: str, now: float) -> dict[str, str]:
        """Count one request of ``access_key``; its headers, or the 429 `Problem` that refuses it."""
        seen = self._seen.setdefault(access_key, deque())
        seen.append(now)
        while seen and seen[0] <= now - self.window:
            seen.popleft()
        if len(seen) > self.requests:
            raise Problem(429, "too-many-requests", "Too many requests.")
        return {
            "X-RateLimit-Limit": str(self.requests),
            "X-RateLimit-Remaining": str(self.requests - len(seen)),
            "X-RateLimit-Window": f"{self.window:g}",
        }
