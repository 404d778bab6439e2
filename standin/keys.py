"""API keys of the stand-in server and HTTP Basic authentication.

``keys.yaml`` is a list of ``{access, secret, role: agent|environment|admin, agentId, hostUuid}``.
Agent and environment keys get *qualified* subscriptions; admin keys are *raw* (and may
publish any event name).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agents.errors import ConfigError

__all__ = ["ROLES", "Key", "KeyRing", "parse_basic"]

ROLES = ("agent", "environment", "admin")


@dataclass(frozen=True)
class Key:
    access: str
    secret: str
    role: str = "agent"
    agent_id: str = ""
    host_uuid: str = ""

    @property
    def raw(self) -> bool:
        """Admin keys subscribe and publish with raw (unqualified) names."""
        return self.role == "admin"

    @property
    def agent(self) -> str:
        """The agent identity used for config items: the key's agentId, else the access key."""
        return self.agent_id or f"key:{self.access}"

    def public(self) -> dict[str, Any]:
        return {"access": self.access, "role": self.role, "agentId": self.agent_id, "hostUuid": self.host_uuid}


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """``Basic base64(a:s)`` -> (a, s); None when absent or malformed."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    access, sep, secret = decoded.partition(":")
    if not sep:
        return None
    return access, secret


class KeyRing:
    def __init__(self, keys: list[Key] | None = None) -> None:
        self._keys: dict[str, Key] = {}
        for k in keys or []:
            self.add(k)

    def add(self, key: Key) -> None:
        if not key.access or not key.secret:
            raise ConfigError("an API key needs both access and secret")
        if key.role not in ROLES:
            raise ConfigError(f"key {key.access!r}: role must be one of {', '.join(ROLES)}, not {key.role!r}")
        self._keys[key.access] = key

    def __len__(self) -> int:
        return len(self._keys)

    def all(self) -> list[Key]:
        return list(self._keys.values())

    def check(self, header: str | None) -> Key | None:
        creds = parse_basic(header)
        if creds is None:
            return None
        key = self._keys.get(creds[0])
        if key is None or not hmac.compare_digest(key.secret.encode(), creds[1].encode()):
            return None
        return key

    @classmethod
    def load(cls, path: str) -> KeyRing:
        try:
            doc = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read keys file {path}: {e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"keys file {path} is not valid YAML: {e}") from e
        if isinstance(doc, dict) and "keys" in doc:
            doc = doc["keys"]
        if not isinstance(doc, list):
            raise ConfigError(f"keys file {path}: expected a list of {{access, secret, role, agentId, hostUuid}}")
        ring = cls()
        for i, item in enumerate(doc):
            if not isinstance(item, dict):
                raise ConfigError(f"keys file {path}: entry {i} is not a map")
            ring.add(
                Key(
                    access=str(item.get("access") or item.get("accessKey") or ""),
                    secret=str(item.get("secret") or item.get("secretKey") or ""),
                    role=str(item.get("role") or "agent"),
                    agent_id=str(item.get("agentId") or item.get("agent_id") or ""),
                    host_uuid=str(item.get("hostUuid") or item.get("host_uuid") or ""),
                )
            )
        return ring
