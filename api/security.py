"""API keys: `Authorization: Bearer KEY` or `X-API-Key: KEY`; scopes read and admin."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from fastapi import Request
from fastapi.security import APIKeyHeader, HTTPBearer

from api.errors import ApiError

READ, ADMIN = "read", "admin"

# Declared for the OpenAPI page (the "Authorize" button); checking happens below.
bearer_scheme = HTTPBearer(auto_error=False, description="An API key as a bearer token.")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False)


@dataclass(frozen=True)
class KeyRing:
    read_keys: tuple[str, ...]
    admin_keys: tuple[str, ...]

    @classmethod
    def build(cls, read_keys: Iterable[str], admin_keys: Iterable[str]) -> KeyRing:
        return cls(tuple(k for k in read_keys if k), tuple(k for k in admin_keys if k))

    @property
    def enabled(self) -> bool:
        return bool(self.read_keys or self.admin_keys)

    def scopes_for(self, key: str) -> frozenset[str]:
        # Compare against every key, always, so timing says nothing about which matched.
        is_admin = any(hmac.compare_digest(key.encode(), k.encode()) for k in self.admin_keys)
        is_read = any(hmac.compare_digest(key.encode(), k.encode()) for k in self.read_keys)
        if is_admin:
            return frozenset({READ, ADMIN})
        if is_read:
            return frozenset({READ})
        return frozenset()


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


def require_scope(keys: KeyRing, request: Request, scope: str) -> None:
    if not keys.enabled:
        return
    key = presented_key(request)
    challenge = {"WWW-Authenticate": "Bearer"}
    if key is None:
        raise ApiError(401, "missing_api_key", "An API key is required.", challenge)
    scopes = keys.scopes_for(key)
    if not scopes:
        raise ApiError(401, "invalid_api_key", "The API key is not valid.", challenge)
    if scope not in scopes:
        raise ApiError(403, "insufficient_scope", f"This key lacks the '{scope}' scope.")
