"""Request signing of the Backend.AI API (HMAC keypair mode), for both ends.

Owns the one definition of the string to sign and of the derived signing key, so
the client (`baifs.api.client`) and the local server (`baifs.server.auth`) cannot
disagree. Follows the manager's `sign_request` and the SDK's
`generate_signature` (reference §1.2, §1.3):

- the string to sign is seven lines: method, raw path with query, the ``Date``
  header exactly as sent, ``host:<Host>``, ``content-type:<media type>``,
  ``x-backendai-version:<version>``, and the hash of the empty body (the body
  itself is never hashed by API versions from v4.20181215 on);
- the signing key is HMAC(HMAC(secret, YYYYMMDD of the date), host).

Invariant: nothing in this module logs or returns the secret key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

#: The API versions a current manager accepts in ``X-BackendAI-Version``.
VALID_VERSIONS: tuple[str, ...] = (
    "v4.20181215",
    "v4.20190115",
    "v4.20190315",
    "v4.20190615",
    "v5.20191215",
    "v6.20200815",
    "v6.20220315",
    "v6.20220615",
    "v6.20221201",
    "v6.20230315",
    "v7.20230615",
    "v8.20240315",
    "v8.20240915",
    "v9.20250722",
)
LATEST_VERSION = VALID_VERSIONS[-1]
VERSION_PATTERN = re.compile(r"^v(\d+)\.(\d{8})$")
HASH_NAME = "sha256"


def version_key(version: str) -> tuple[int, str]:
    """Sort key of a ``vN.YYYYMMDD`` version string; ValueError if malformed."""
    match = VERSION_PATTERN.match(version)
    if match is None:
        raise ValueError(f"malformed API version {version!r}")
    return int(match.group(1)), match.group(2)


def format_date(moment: datetime) -> str:
    """The ``Date`` header value the SDK sends: ISO 8601 with microseconds."""
    return moment.astimezone(UTC).isoformat()


def parse_date(value: str) -> datetime:
    """Parse a ``Date`` header in ISO 8601 or RFC 1123 form (naive means UTC)."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"unparsable date {value!r}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


def signature(
    *,
    method: str,
    path_with_query: str,
    date_header: str,
    host: str,
    media_type: str,
    version: str,
    secret_key: str,
    hash_name: str = HASH_NAME,
) -> str:
    """The hex signature of one request."""
    empty_body_hash = hashlib.new(hash_name, b"").hexdigest()
    string_to_sign = "\n".join(
        (
            method.upper(),
            path_with_query,
            date_header,
            f"host:{host}",
            f"content-type:{media_type.lower()}",
            f"x-backendai-version:{version}",
            empty_body_hash,
        )
    )
    day = parse_date(date_header).strftime("%Y%m%d")
    key = hmac.new(secret_key.encode(), day.encode(), hash_name).digest()
    key = hmac.new(key, host.encode(), hash_name).digest()
    return hmac.new(key, string_to_sign.encode(), hash_name).hexdigest()


def authorization_header(access_key: str, signature_hex: str, hash_name: str = HASH_NAME) -> str:
    return f"BackendAI signMethod=HMAC-{hash_name.upper()}, credential={access_key}:{signature_hex}"


def media_type_of(content_type: str | None) -> str:
    """The media type without parameters, as aiohttp reports it (absent: octet-stream)."""
    if not content_type:
        return "application/octet-stream"
    return content_type.split(";", 1)[0].strip().lower()
