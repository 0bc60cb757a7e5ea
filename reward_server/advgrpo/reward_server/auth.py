"""Bearer tokens with scopes, the same on the gRPC and HTTP sides.

A token has one scope: ``score`` (Score, ScoreStream, ListModels, CheckSharedMemory and their HTTP
routes) or ``update``, which adds UpdateDiscriminator (``/v1/update``). An update changes the
reward every trainer on the server receives, so it is the scope to hand out sparingly.

Tokens come from ``--tokens-file`` (one ``TOKEN SCOPE`` per line, ``#`` comments), from
``$ADVGRPO_TOKENS`` (the same lines, or entries separated by commas), and from ``--auth-token`` /
``$ADVGRPO_AUTH_TOKEN`` (one token with the ``update`` scope, as before scopes existed).

Lookup compares the SHA-256 of the presented token with every configured token's, each with
``hmac.compare_digest`` and without stopping at a match: the time taken says nothing about which
token, or how much of one, was right.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from advgrpo.common.errors import ConfigError

Scope = Literal["score", "update"]
SCOPES: tuple[Scope, ...] = ("score", "update")
TOKENS_ENV = "ADVGRPO_TOKENS"
TOKEN_ENV = "ADVGRPO_AUTH_TOKEN"
# What each RPC needs; an RPC of RewardService not listed needs "update" (fail closed).
METHOD_SCOPES: dict[str, Scope] = {
    "Score": "score",
    "ScoreStream": "score",
    "ListModels": "score",
    "CheckSharedMemory": "score",
    "UpdateDiscriminator": "update",
}
MIN_TOKEN_CHARS = 16  # a token is a secret: refuse short ones, which can be guessed


def allows(granted: Scope, needed: Scope) -> bool:
    """``update`` implies ``score``."""
    return granted == "update" or granted == needed


@dataclass(frozen=True)
class TokenTable:
    """The configured tokens, kept as SHA-256 digests with their scopes."""

    entries: tuple[tuple[bytes, Scope], ...]

    def __bool__(self) -> bool:
        return bool(self.entries)

    def scope_of(self, token: str | bytes) -> Scope | None:
        """The scope of ``token``, or None for an unknown one; in constant time over the table."""
        if isinstance(token, str):
            token = token.encode("utf-8", errors="surrogateescape")
        digest = hashlib.sha256(token).digest()
        found: Scope | None = None
        for expected, scope in self.entries:
            if hmac.compare_digest(digest, expected) and found is None:
                found = scope
        return found

    def scope_of_header(self, value: str | bytes | None) -> Scope | None:
        """The scope of an ``authorization`` value ``Bearer <token>`` (scheme in any case)."""
        if value is None:
            return None
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="surrogateescape")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.scope_of(token.strip())


def parse_tokens(text: str, source: str) -> list[tuple[str, Scope]]:
    """``TOKEN SCOPE`` entries, one per line or separated by commas; ``#`` starts a comment.
    Errors name ``source`` and the line, never the token."""
    out: list[tuple[str, Scope]] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0]
        for entry in line.split(","):
            fields = entry.split()
            if not fields:
                continue
            where = f"{source}, line {number}"
            if len(fields) != 2:
                raise ConfigError(f"{where}: expected 'TOKEN SCOPE' (scope: score or update), got {len(fields)} fields")
            token, scope = fields
            if scope not in SCOPES:
                raise ConfigError(f"{where}: unknown scope {scope!r} (score or update)")
            if len(token) < MIN_TOKEN_CHARS:
                raise ConfigError(f"{where}: a token must have at least {MIN_TOKEN_CHARS} characters")
            out.append((token, scope))
    return out


def read_tokens_file(path: Path) -> list[tuple[str, Scope]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"--tokens-file {path}: cannot read ({reason})") from None
    entries = parse_tokens(text, f"--tokens-file {path}")
    if not entries:
        raise ConfigError(f"--tokens-file {path}: no tokens in it (one 'TOKEN SCOPE' per line)")
    return entries


def build_table(tokens_file: Path | None, env_tokens: str | None = None, single_token: str | None = None) -> TokenTable:
    """Every configured token; the same token twice with two scopes is an error."""
    entries: list[tuple[str, Scope]] = []
    if tokens_file is not None:
        entries += read_tokens_file(tokens_file)
    if env_tokens:
        entries += parse_tokens(env_tokens, f"${TOKENS_ENV}")
    if single_token:
        entries.append((single_token, "update"))
    scopes: dict[bytes, Scope] = {}
    for token, scope in entries:
        digest = hashlib.sha256(token.encode("utf-8", errors="surrogateescape")).digest()
        if scopes.setdefault(digest, scope) != scope:
            raise ConfigError("tokens: one token is configured with two scopes (score and update)")
    return TokenTable(tuple(scopes.items()))


def needed_scope(method: str) -> Scope:
    """The scope a full gRPC method name (``/advgrpo.reward.v1.RewardService/Score``) needs."""
    return METHOD_SCOPES.get(method.rsplit("/", 1)[-1], "update")
