"""Where the cluster's shared secret comes from (see docs/security.md).

In order: the ``secret=`` argument of the facade, the file named by ``--secret-file`` or
``network.secret_file``, the ``BUTTERFLY_SECRET`` environment variable. None of them: no
authentication, which a worker accepts only on a loopback address or with ``--insecure``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from .errors import ApiError, ConfigError
from .protocol.auth import SECRET_MIN_BYTES

__all__ = ["SECRET_ENV", "generate_secret", "is_loopback", "load_secret"]

log = logging.getLogger(__name__)

SECRET_ENV = "BUTTERFLY_SECRET"
_HOW = "generate one with: python -c 'import secrets; print(secrets.token_hex(32))'"


def generate_secret() -> str:
    """A fresh random secret (256 bits, hex), as ``Butterfly.local`` gives its workers."""
    return secrets.token_hex(32)


def load_secret(
    secret: str | bytes | None = None,
    *,
    secret_file: str | os.PathLike[str] = "",
    environ: Mapping[str, str] = os.environ,
) -> bytes | None:
    """The shared secret as bytes, or ``None`` when none is configured.

    Surrounding whitespace (a file's final newline) is not part of the secret. Raises
    ``ApiError`` for a bad ``secret`` argument and ``ConfigError`` for a bad file or variable.
    """
    if secret is not None:
        if not isinstance(secret, str | bytes):
            raise ApiError(f"secret must be str or bytes, got {type(secret).__name__}")
        value = secret.encode() if isinstance(secret, str) else secret
        return _checked(value.strip(), "secret", ApiError)
    if secret_file:
        path = Path(secret_file).expanduser()
        try:
            value = path.read_bytes()
            mode = path.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {str(path)!r}: {exc.strerror}") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "secret file %s can be read by other users (mode %o); chmod 600 it",
                path,
                stat.S_IMODE(mode),
            )
        return _checked(value.strip(), f"secret file {str(path)!r}", ConfigError)
    if environ.get(SECRET_ENV):
        return _checked(environ[SECRET_ENV].encode().strip(), SECRET_ENV, ConfigError)
    return None


def _checked(value: bytes, what: str, error: type[ApiError] | type[ConfigError]) -> bytes:
    if len(value) < SECRET_MIN_BYTES:
        raise error(
            f"{what} has {len(value)} bytes; a shared secret needs at least {SECRET_MIN_BYTES} "
            f"({_HOW})"
        )
    return value


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface
