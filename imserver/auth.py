"""Bearer tokens: standard JSON Web Tokens (RFC 7519), verified with PyJWT.

Theory of operation
-------------------
A client proves who it is with one token in ``Hello``: a JWT in compact JWS
form. Two kinds of issuer sign them:

* **the platform**, with the server's secret (HS256, no ``kid``):
  ``imserver token`` and ``mint_token`` in development, the platform's own
  backend in production. It may name any user, role and shop.
* **a shop's backend**, with its own private key (RS256, ES256 or EdDSA). The
  server holds only the public half, in that shop's JWKS file (``ShopKeys``).
  The token names its key with ``kid`` and its shop with ``shop``, and the key
  is looked up in *that shop's* key set only. So a shop key vouches for its
  own shop and nothing else: ``shop`` is that shop (never "" or "*"), ``sub``
  lies in the shop's namespace (``"SHOP:..."``, so it can never name another
  shop's or the platform's users, who share the server's per-user fan-out),
  and the role is not admin.

The algorithm comes from the key, never from the token: the secret verifies
HS256 only, a shop key only the algorithm PyJWK binds to it. ``none``, an
unknown algorithm and HS256 "signed" with a public key (algorithm confusion)
therefore fail in PyJWT. Before PyJWT sees a token we insist on the canonical
compact form (three base64url segments: no padding, whitespace or other
characters; PyJWT itself refuses non-canonical base64 but accepts padding) and
refuse duplicate JSON keys in header and claims (PyJWT's ``json.loads`` keeps
the last one silently). After the signature, the claims are checked here,
typed by msgspec: ``sub``, ``role``, ``iat``, ``exp`` and ``jti`` required;
lifetime at most ``MAX_TOKEN_TTL_S``; ``iat``/``nbf`` at most
``TOKEN_CLOCK_SKEW_S`` ahead; role and shop consistent (``_claims_problem``).

Claims: ``sub`` user id, ``role``, ``shop`` (the tenant: staff and workers
always name one, "*" for all shops only when asked for explicitly, admins and
global workers; a customer's is "" for a platform buyer, or the shop that
vouches for them), ``iat`` and ``exp`` (unix seconds), ``jti`` (a unique id),
``once`` and, for workers, ``plugin`` (the plugin the token may join as).

A token with ``once`` set is single use: its jti is remembered until it
expires and a second Hello with it is refused as a replay. The server also
stores each used jti (``PutUsedToken``) and reloads the unexpired ones at
start (``remember_used``), so a restart does not make a used token valid again.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import jwt
import msgspec
import trio

from protocol import Role

from . import logs
from .limits import (
    JWKS_FETCH_TIMEOUT_S,
    JWKS_RECHECK_S,
    JWKS_URL_COOLDOWN_S,
    JWKS_URL_REFRESH_S,
    MAX_ID_CHARS,
    MAX_JWKS_BYTES,
    MAX_JWKS_KEYS,
    MAX_TOKEN_TTL_S,
    MIN_SECRET_BYTES,
    TOKEN_CLOCK_SKEW_S,
    TOKEN_REPLAY_CACHE,
)

log = logging.getLogger("imserver.auth")

SERVER_ALGORITHM: Final = "HS256"
"""What the server's secret signs and verifies."""

SHOP_ALGORITHMS: Final = frozenset({"RS256", "ES256", "EdDSA"})
"""What a shop's public keys may verify (asymmetric only: the server never
holds a shop's signing key)."""

NAMESPACE_SEP: Final = ":"
"""Between a shop id and its own user id in the ``sub`` of a shop-signed token."""

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
_OptId = Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]


class Claims(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    sub: _Id
    role: Role
    shop: _OptId = ""
    iat: int
    exp: int
    jti: _Id
    once: bool = False
    plugin: _OptId = ""


class _NotBefore(msgspec.Struct):
    """The registered ``nbf`` claim, checked if present and then dropped."""

    nbf: int | None = None


class _Header(msgspec.Struct):
    alg: str
    kid: str = ""


class TokenError(Exception):
    """The token is not acceptable; the message says why (for the Error frame)."""


_COMPACT: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise TokenError("malformed token (duplicate JSON key)")
    return obj


_T = TypeVar("_T")


def _unb64(segment: str) -> bytes:
    """base64url without padding, canonical only: the unused low bits of the
    last character must be zero, so each byte string has exactly one text."""
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != segment.encode("ascii"):
        raise ValueError("non-canonical base64url")
    return raw


# Built once: json.loads with a hook builds a new decoder on every call.
_json: Final = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _segment(segment: str, what: str) -> Any:
    """One base64url JSON segment; duplicate keys refused."""
    try:
        return _json.decode(_unb64(segment).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise TokenError(f"malformed token {what}: {exc}") from None


def _typed(obj: Any, kind: type[_T], what: str) -> _T:
    try:
        return msgspec.convert(obj, kind)
    except msgspec.ValidationError as exc:
        raise TokenError(f"malformed token {what}: {exc}") from None


def _claims_problem(role: Role, shop: str, plugin: str) -> str:
    """Why this role, shop and plugin do not fit together ("" if they do)."""
    if plugin and role is not Role.WORKER:
        return "only worker tokens name a plugin"
    if role is Role.CUSTOMER:
        return "customer tokens name one shop or none" if shop == "*" else ""
    if role in (Role.AGENT, Role.SUPERVISOR) and shop in ("", "*"):
        return f"{role} tokens name their shop"
    if role is Role.WORKER and not shop:
        return "worker tokens name their shop ('*' for all shops)"
    if role is Role.ADMIN and shop != "*":
        return "admin tokens are for all shops (shop '*')"
    return ""


def mint_token(
    secret: bytes,
    *,
    user: str,
    role: Role | str,
    shop: str = "",
    ttl_s: int = 3600,
    once: bool = False,
    plugin: str = "",
    now: float | None = None,
) -> str:
    """A platform token: a JWT signed with the server's secret (HS256). Staff
    and worker tokens must name their shop: all-shops power (shop "*") is never
    a default, so shop "" is refused for them."""
    role = Role(role)
    problem = _claims_problem(role, shop, plugin)
    if problem:
        raise ValueError(problem)
    issued = int(time.time() if now is None else now)
    claims = Claims(
        sub=user,
        role=role,
        shop=shop,
        iat=issued,
        exp=issued + ttl_s,
        jti=secrets.token_hex(8),
        once=once,
        plugin=plugin,
    )
    return jwt.encode(msgspec.to_builtins(claims), secret, algorithm=SERVER_ALGORITHM)


def _check_key_shop(shop: str) -> None:
    if not shop or shop == "*" or NAMESPACE_SEP in shop or len(shop) > MAX_ID_CHARS:
        raise ValueError(
            f"{shop!r} cannot hold keys: a shop id is 1..{MAX_ID_CHARS} characters, "
            f"not '*', without {NAMESPACE_SEP!r}"
        )


def load_jwks(data: bytes, *, source: str = "JWKS") -> dict[str, jwt.PyJWK]:
    """A shop's public keys by kid, from the text of a JWKS (RFC 7517). Strict:
    every key has a unique ``kid``, is public (no private part), signs
    (``use`` absent or "sig"), uses one of ``SHOP_ALGORITHMS`` and is long
    enough for it; anything else is a ValueError naming the problem."""
    if len(data) > MAX_JWKS_BYTES:
        raise ValueError(f"{source}: over {MAX_JWKS_BYTES} bytes")
    try:
        doc = json.loads(data, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError, TokenError) as exc:
        raise ValueError(f"{source}: not JSON without duplicate keys ({exc})") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_JWKS_KEYS:
        raise ValueError(f'{source}: wants {{"keys": [1..{MAX_JWKS_KEYS} JWKs]}}')
    keys: dict[str, jwt.PyJWK] = {}
    for entry in entries:
        kid = entry.get("kid") if isinstance(entry, dict) else None
        if not isinstance(kid, str) or not kid or kid in keys:
            raise ValueError(f"{source}: every key needs its own non-empty kid")
        assert isinstance(entry, dict)
        if entry.get("kty") == "oct" or any(part in entry for part in ("d", "p", "q", "k")):
            raise ValueError(f"{source}: key {kid!r} is secret or private; publish the public key")
        if entry.get("use", "sig") != "sig":
            raise ValueError(f"{source}: key {kid!r} is not a signing key")
        if "alg" in entry and entry["alg"] not in SHOP_ALGORITHMS:
            raise ValueError(f"{source}: key {kid!r}: alg not one of {sorted(SHOP_ALGORITHMS)}")
        try:
            key = jwt.PyJWK(entry)
        except jwt.PyJWTError as exc:
            raise ValueError(f"{source}: key {kid!r}: {exc}") from None
        if key.algorithm_name not in SHOP_ALGORITHMS:
            raise ValueError(f"{source}: key {kid!r}: {key.algorithm_name} not allowed")
        weak = key.Algorithm.check_key_length(key.key)
        if weak:
            raise ValueError(f"{source}: key {kid!r}: {weak}")
        keys[kid] = key
    return keys


@dataclass
class _KeySet:
    path: Path
    keys: dict[str, jwt.PyJWK] = field(default_factory=dict)
    stamp: tuple[int, int, int] | None = None
    checked_at: float = -math.inf


class ShopKeys:
    """The public keys each shop's backend signs its tokens with: one JWKS
    per shop, from a file named explicitly (``files``: shop -> path), a file
    ``SHOP.json`` in ``directory``, or a URL (``urls``: shop -> http(s) URL).

    Files and directory are checked again at most every ``JWKS_RECHECK_S``
    when a key is looked up, so adding a shop, rotating (publish the new key
    beside the old, then drop the old) and withdrawing a key need no restart. A
    file that turns unreadable or invalid leaves its shop with no keys (fail
    closed) and is logged.

    URLs are fetched by ``run`` (a task of the server), off the event loop with
    PyJWT's ``PyJWKClient``: at start, every ``JWKS_URL_REFRESH_S``, and soon
    after a token names a kid the shop's set does not hold (at most once per
    ``JWKS_URL_COOLDOWN_S``); that token itself is refused, the client's retry
    gets in. A failed fetch keeps the shop's last good keys."""

    def __init__(
        self,
        files: Mapping[str, Path] | None = None,
        directory: Path | None = None,
        *,
        urls: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._explicit = dict(files or {})
        for shop in (*self._explicit, *(urls or {})):
            _check_key_shop(shop)
            if shop in self._explicit and shop in (urls or {}):
                raise ValueError(f"shop {shop}: a JWKS file or a URL, not both")
        try:
            self._clients = {
                shop: jwt.PyJWKClient(url, cache_jwk_set=False, timeout=JWKS_FETCH_TIMEOUT_S)
                for shop, url in (urls or {}).items()
            }
        except jwt.PyJWKClientError as exc:
            raise ValueError(str(exc)) from None
        self._fetched: dict[str, dict[str, jwt.PyJWK]] = {}
        self._wake = trio.Event()
        self._directory = directory
        self._clock = clock
        self._sets: dict[str, _KeySet] = {}
        self._scanned_at = -math.inf
        # At start every file must be valid: a typo is one clear line, not a
        # shop whose buyers are all refused.
        now = clock()
        self._scan(now)
        for shop, keyset in self._sets.items():
            self._refresh(keyset, now, strict=True)
            if not keyset.keys:
                raise ValueError(f"shop {shop}: {keyset.path} holds no keys")

    @property
    def shops(self) -> list[str]:
        return sorted({*self._sets, *self._clients})

    def key(self, shop: str, kid: str) -> jwt.PyJWK:
        if shop in self._clients:
            key = self._fetched.get(shop, {}).get(kid)
            if key is None:
                self._wake.set()  # perhaps a key published since the last fetch
                raise TokenError("unknown token key (kid) for this shop")
            return key
        now = self._clock()
        if now - self._scanned_at >= JWKS_RECHECK_S:
            self._scan(now)
        keyset = self._sets.get(shop)
        if keyset is not None and now - keyset.checked_at >= JWKS_RECHECK_S:
            self._refresh(keyset, now)
        key = keyset.keys.get(kid) if keyset is not None else None
        if key is None:
            raise TokenError("unknown token key (kid) for this shop")
        return key

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the URL key sets fresh; started once the first fetch is done."""
        await self.refresh_urls()
        task_status.started()
        if not self._clients:
            return
        while True:
            with trio.move_on_after(JWKS_URL_REFRESH_S):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.refresh_urls()
            await trio.sleep(JWKS_URL_COOLDOWN_S)

    async def refresh_urls(self) -> None:
        for shop, client in self._clients.items():
            try:
                data = await trio.to_thread.run_sync(client.fetch_data, abandon_on_cancel=True)
                keys = load_jwks(json.dumps(data).encode(), source=client.uri)
            except (jwt.PyJWKClientError, ValueError, TypeError) as exc:
                logs.event(
                    log, "jwks_fetch_failed", level=logging.ERROR, url=client.uri, why=str(exc)
                )
                continue
            if keys.keys() != self._fetched.get(shop, {}).keys():
                logs.event(log, "jwks_loaded", url=client.uri, kids=sorted(keys))
            self._fetched[shop] = keys

    def _scan(self, now: float) -> None:
        self._scanned_at = now
        paths = dict(self._explicit)
        if self._directory is not None:
            try:
                names = os.listdir(self._directory)
            except FileNotFoundError:
                names = []
            for name in names:
                shop, dot, ext = name.rpartition(".")
                if not dot or ext != "json" or name.startswith(".") or shop in paths:
                    continue
                try:
                    _check_key_shop(shop)
                except ValueError as exc:
                    logs.event(log, "jwks_skipped", level=logging.WARNING, file=name, why=str(exc))
                    continue
                paths[shop] = self._directory / name
        for shop in self._sets.keys() - paths.keys():
            del self._sets[shop]
        for shop, path in paths.items():
            if shop not in self._sets or self._sets[shop].path != path:
                self._sets[shop] = _KeySet(path)

    def _refresh(self, keyset: _KeySet, now: float, *, strict: bool = False) -> None:
        keyset.checked_at = now
        try:
            st = keyset.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == keyset.stamp:
                return
            keyset.stamp = stamp
            keyset.keys = load_jwks(keyset.path.read_bytes(), source=str(keyset.path))
        except (OSError, ValueError) as exc:
            if strict:
                raise ValueError(str(exc)) from None
            keyset.stamp, keyset.keys = None, {}
            logs.event(
                log, "jwks_invalid", level=logging.ERROR, path=str(keyset.path), why=str(exc)
            )
        else:
            logs.event(log, "jwks_loaded", path=str(keyset.path), kids=sorted(keyset.keys))


class TokenVerifier:
    """Checks form, signature, claims and single use. ``now`` is unix seconds."""

    def __init__(
        self,
        secret: bytes,
        *,
        shop_keys: ShopKeys | None = None,
        replay_cache: int = TOKEN_REPLAY_CACHE,
    ) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the token secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        self._shop_keys = shop_keys
        self._jws = jwt.PyJWS(options={"enforce_minimum_key_length": True})
        self._used: OrderedDict[str, int] = OrderedDict()  # jti -> exp, oldest first
        self._replay_cache = replay_cache

    def verify(self, token: str, now: float | None = None) -> Claims:
        now = time.time() if now is None else now
        if not _COMPACT.fullmatch(token):
            raise TokenError("malformed token (not three unpadded base64url segments)")
        head, body, signature = token.split(".")
        header = _typed(_segment(head, "header"), _Header, "header")
        payload = _segment(body, "claims")
        claims = _typed(payload, Claims, "claims")
        not_before = _typed(payload, _NotBefore, "claims")
        try:
            _unb64(signature)
        except ValueError:
            raise TokenError("malformed token signature (non-canonical base64url)") from None
        key: jwt.PyJWK | bytes
        if header.kid:  # a shop's key, found among that shop's keys only
            if self._shop_keys is None:
                raise TokenError("unknown token key (kid): no shop keys configured")
            key = self._shop_keys.key(claims.shop, header.kid)
            algorithm = key.algorithm_name
        else:
            key, algorithm = self._secret, SERVER_ALGORITHM
        try:
            self._jws.decode_complete(token, key, algorithms=[algorithm])
        except jwt.InvalidSignatureError:
            raise TokenError("bad token signature") from None
        except jwt.InvalidAlgorithmError:
            raise TokenError(
                f"token algorithm not allowed (this key verifies {algorithm})"
            ) from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"malformed token: {exc}") from None
        if header.kid:
            if claims.role is Role.ADMIN:
                raise TokenError("a shop key cannot vouch for an admin")
            if not claims.sub.startswith(claims.shop + NAMESPACE_SEP):
                raise TokenError(f"a token signed by a shop key names users '{claims.shop}:...'")
        if claims.exp <= now:
            raise TokenError("token expired")
        if claims.exp - claims.iat > MAX_TOKEN_TTL_S:
            raise TokenError("token lifetime over the maximum")
        if claims.iat > now + TOKEN_CLOCK_SKEW_S:
            raise TokenError("token issued in the future")
        if not_before.nbf is not None and not_before.nbf > now + TOKEN_CLOCK_SKEW_S:
            raise TokenError("token not valid yet (nbf)")
        problem = _claims_problem(claims.role, claims.shop, claims.plugin)
        if problem:
            raise TokenError(problem)
        if claims.once:
            self._remember(claims, now)
        return claims

    def remember_used(self, jti: str, exp: int) -> None:
        """A single-use token used before (e.g. before a restart); call in
        ascending ``exp`` order, oldest first, as the cache evicts from the front."""
        self._used[jti] = exp
        while len(self._used) > self._replay_cache:
            self._used.popitem(last=False)

    def _remember(self, claims: Claims, now: float) -> None:
        while self._used:
            oldest_jti, oldest_exp = next(iter(self._used.items()))
            if oldest_exp > now and len(self._used) < self._replay_cache:
                break
            del self._used[oldest_jti]
        if claims.jti in self._used:
            raise TokenError("token replayed (single-use token already used)")
        self._used[claims.jti] = claims.exp
