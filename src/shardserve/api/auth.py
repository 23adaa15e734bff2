"""Tenants and API keys.

The auth file (YAML) stores only SHA-256 digests of keys (``shardserve hash-key`` prints one):

    admin_keys: [sha256:9f86d0...]
    tenants:
      acme: {keys: [sha256:...], models: [llama, embedder]}   # or models: "*"

A model's ``model.yaml`` may also name the tenants that may use it (``tenants: [acme]``).
A request's ``Authorization: Bearer KEY`` is hashed and compared with every stored digest in
constant time. A tenant sees and calls only its models: another tenant's model is a 404, as if
it did not exist. Admin keys control the repository (load, unload).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from shardserve.api.errors import APIError


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    tenant: str | None  # None: the admin
    models: frozenset[str] | None  # None: every model
    admin: bool

    def may_use(self, model: str, tenants: tuple[str, ...] = ()) -> bool:
        """Whether this caller may see ``model``: listed for its tenant in the auth file, or
        its tenant listed in the model's ``model.yaml`` (``tenants``)."""
        return (self.models is None or model in self.models
                or (self.tenant is not None and self.tenant in tenants))


OPEN = Principal(None, None, False)  # no --auth: loopback clients, every model, no admin


@dataclass(frozen=True)
class Auth:
    entries: tuple[tuple[str, Principal], ...]  # (digest, who)

    @staticmethod
    def from_file(path: str) -> Auth:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: cannot read: {e}") from None
        if not isinstance(data, dict) or set(data) - {"admin_keys", "tenants"}:
            raise ValueError(f"{path}: expected the fields admin_keys and tenants")
        entries = [(_digest(path, d), Principal(None, None, True))
                   for d in _list(path, "admin_keys", data.get("admin_keys"))]
        tenants = data.get("tenants") or {}
        if not isinstance(tenants, dict):
            raise ValueError(f"{path}: tenants must be a mapping of tenant name to "
                             "{keys: [...], models: [...]}")
        for tenant, spec in tenants.items():
            where = f"tenants.{tenant}"
            if not isinstance(spec, dict) or set(spec) - {"keys", "models"}:
                raise ValueError(f"{path}: {where} needs keys and models")
            models = spec.get("models", [])
            allowed = None if models == "*" else frozenset(_list(path, f"{where}.models",
                                                                 models))
            entries += [(_digest(path, d), Principal(str(tenant), allowed, False))
                        for d in _list(path, f"{where}.keys", spec.get("keys"))]
        if not entries:
            raise ValueError(f"{path}: no keys; add admin_keys or tenants")
        digests = [d for d, _ in entries]
        if len(set(digests)) != len(digests):
            raise ValueError(f"{path}: a key digest is listed twice; each key must belong to "
                             "exactly one admin or tenant")
        return Auth(tuple(entries))

    def identify(self, key: str) -> Principal | None:
        digest, found = hash_key(key), None
        for stored, who in self.entries:  # no early exit: time does not depend on the match
            if hmac.compare_digest(stored, digest):
                found = who
        return found


def _list(path: str, where: str, value: object) -> list[str]:
    """A YAML list of non-empty strings (None: empty). A bare string is refused: it would
    otherwise be read as a list of its letters."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{path}: {where} must be a list of strings, e.g. [a, b]"
                         + (' (or "*" for every model)' if where.endswith("models") else ""))
    return value


def _digest(path: str, value: object) -> str:
    if not isinstance(value, str) or not value.startswith("sha256:") or len(value) != 71 \
            or not all(c in "0123456789abcdef" for c in value[7:]):
        raise ValueError(f"{path}: keys are stored as 'sha256:<64 hex digits>' "
                         "(see `shardserve hash-key`), never in clear")
    return value


def _identify(request: Request) -> Principal:
    auth: Auth | None = request.app.state.auth
    if auth is None:
        return OPEN
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", None,
                       "invalid_api_key")
    who = auth.identify(key.strip())
    if who is None:
        raise APIError(401, "invalid API key", None, "invalid_api_key")
    return who


# The dependencies are coroutines because they never block: FastAPI runs a plain function
# dependency on a worker thread, a thread handoff on every request.
async def principal(request: Request) -> Principal:
    """FastAPI dependency: who is calling; 401 without a valid key when auth is on."""
    return _identify(request)


async def require_admin(request: Request) -> Principal:
    who = _identify(request)
    if request.app.state.auth is None:
        raise APIError(403, "repository control needs an admin key: start the server with "
                            "--auth FILE", None, "forbidden")
    if not who.admin:
        raise APIError(403, "this key may not control the repository", None, "forbidden")
    return who
