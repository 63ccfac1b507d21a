"""API keys → tenants. Keys are looked up by their SHA-256 digest, so the comparison time
does not depend on how much of a key an attacker guessed right."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from laneway.config import DEFAULT_TENANT
from laneway.errors import Unauthorized


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str
    admin: bool


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Auth:
    def __init__(self, api_keys: Mapping[str, str], admin_keys: list[str]) -> None:
        self._tenants = {_digest(key): tenant for key, tenant in api_keys.items()}
        self._admins = {_digest(key) for key in admin_keys}
        self.open = not self._tenants and not self._admins

    def caller(self, headers: Mapping[str, str]) -> Caller:
        if self.open:
            return Caller(DEFAULT_TENANT, admin=True)
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("missing API key: send Authorization: Bearer KEY")
        digest = _digest(key.strip())
        if digest in self._admins:
            return Caller(DEFAULT_TENANT, admin=True)
        tenant = self._tenants.get(digest)
        if tenant is None:
            raise Unauthorized("invalid API key")
        return Caller(tenant, admin=False)
