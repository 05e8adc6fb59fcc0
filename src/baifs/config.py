"""Where baifs keeps things, and where the credentials come from.

Credentials are read, in this order, from:

1. the profile named with ``--profile`` in ``~/.config/baifs/config.toml``;
2. the official SDK's variables ``BACKEND_ENDPOINT``, ``BACKEND_ACCESS_KEY`` and
   ``BACKEND_SECRET_KEY`` (``SORNA_*`` as fallbacks, like the SDK), from the
   environment or, as the SDK reads them too, from the nearest ``.env`` file
   of the working directory and its parents;
3. the profile ``default`` of the same file.

Invariants: a configuration file that holds a secret and is readable by group or
others is refused, never read; a secret key never appears in a ``repr``, a log
line or an error message. Secrets are never taken from the command line, where
every user of the machine could read them in ``ps``.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import dotenv

from .errors import BaifsError

CONFIG_FILE_NAME = "config.toml"


class ConfigError(BaifsError):
    """The configuration or the credentials are missing or unsafe."""


def _xdg(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable)
    return Path(value) if value else Path.home() / fallback


def config_dir() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "baifs"


def data_dir() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "baifs"


def state_dir() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state") / "baifs"


def cache_dir() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache") / "baifs"


@dataclass(frozen=True)
class Credentials:
    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)

    def __post_init__(self) -> None:
        if not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"endpoint {self.endpoint!r} must start with http:// or https://")
        if not self.access_key or not self.secret_key:
            raise ConfigError("both an access key and a secret key are needed")


def check_private(path: Path) -> None:
    """Refuse a file that holds secrets unless only its owner can read it."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path} is readable by other users (mode {stat.filemode(mode)}); "
            f"it holds a secret key, so baifs refuses it. Fix with: chmod 600 {path}"
        )


def write_private(path: Path, text: str) -> None:
    """Write a file that only its owner can read, created with mode 0600 from the start."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def load_profiles(path: Path) -> dict[str, dict[str, str]]:
    if not path.exists():
        return {}
    check_private(path)
    try:
        document = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    profiles = document.get("profiles", {})
    if not isinstance(profiles, dict):
        raise ConfigError(f"{path}: 'profiles' must be a table of tables")
    return profiles


def _environment(key: str) -> str:
    """``BACKEND_<key>`` (or the older ``SORNA_<key>``) from the environment, else from a ``.env`` file.

    Like the official client, the nearest ``.env`` from the working directory
    upward is read; the environment wins over it.
    """
    names = (f"BACKEND_{key}", f"SORNA_{key}")
    found = next((os.environ[name] for name in names if os.environ.get(name)), "")
    if found:
        return found
    dotenv = _dotenv()
    return next((dotenv[name] for name in names if dotenv.get(name)), "")


def _dotenv() -> dict[str, str]:
    path = dotenv.find_dotenv(usecwd=True)
    if not path:
        return {}
    return {name: value for name, value in dotenv.dotenv_values(path).items() if value is not None}


def _from_profile(path: Path, name: str, profile: dict[str, str]) -> Credentials:
    missing = [key for key in ("endpoint", "access_key", "secret_key") if not profile.get(key)]
    if missing:
        raise ConfigError(f"profile {name!r} in {path} lacks {', '.join(missing)}")
    return Credentials(profile["endpoint"], profile["access_key"], profile["secret_key"])


def load_credentials(profile: str | None = None, config_path: Path | None = None) -> Credentials:
    path = config_path or config_dir() / CONFIG_FILE_NAME
    if profile is not None:
        profiles = load_profiles(path)
        if profile not in profiles:
            raise ConfigError(f"no profile {profile!r} in {path}")
        return _from_profile(path, profile, profiles[profile])
    endpoint, access, secret = (_environment(k) for k in ("ENDPOINT", "ACCESS_KEY", "SECRET_KEY"))
    if access or secret:
        if not (endpoint and access and secret):
            raise ConfigError("BACKEND_ENDPOINT, BACKEND_ACCESS_KEY and BACKEND_SECRET_KEY must all be set")
        return Credentials(endpoint, access, secret)
    profiles = load_profiles(path)
    if "default" in profiles:
        return _from_profile(path, "default", profiles["default"])
    raise ConfigError(
        "no credentials: set BACKEND_ENDPOINT, BACKEND_ACCESS_KEY and BACKEND_SECRET_KEY, "
        f"or add a [profiles.default] table to {path} (mode 0600)"
    )
