"""Short-lived package download tokens scoped to one function version (HMAC-signed, with an expiry), so a
runtime pod can fetch its package from the API without any service credential or caller token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time

from router.config import Config, persistent_secret

KEY_FILE = "download-token.key"


def secret_from_config(config: Config) -> bytes:
    """$HEADWATER_DOWNLOAD_TOKEN_SECRET or [engine] download_token_secret, else a random key kept in <data_dir>/download-token.key (created once,
    mode 0600) so the API and engine processes of one machine agree without configuration."""
    configured = os.environ.get("HEADWATER_DOWNLOAD_TOKEN_SECRET") or config.engine.download_token_secret
    if configured:
        return configured.encode()
    return persistent_secret(config, KEY_FILE).encode()


def _mac(secret: bytes, function_id: str, version: int, expires: int) -> str:
    message = f"{function_id}\n{int(version)}\n{expires}".encode()
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def issue(secret: bytes, function_id: str, version: int, ttl: int, now: float | None = None) -> str:
    """A token letting its bearer download this one function version's package for `ttl` seconds."""
    expires = int((time.time() if now is None else now) + ttl)
    return f"{expires}.{_mac(secret, function_id, version, expires)}"


def verify(secret: bytes, token: str | None, function_id: str, version: int, now: float | None = None) -> bool:
    """True when `token` was issued with `secret` for exactly this function version and has not expired."""
    if not token or "." not in token:
        return False
    expires_text, _, mac = token.partition(".")
    try:
        expires = int(expires_text)
    except ValueError:
        return False
    if expires < (time.time() if now is None else now):
        return False
    return hmac.compare_digest(mac, _mac(secret, function_id, version, expires))
