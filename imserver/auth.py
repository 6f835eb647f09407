"""Signed bearer tokens (HMAC-SHA256) and who may see what.

Token format (ASCII, URL-safe)::

    base64url(msgpack(claims)) "." base64url(HMAC-SHA256(secret, first part))

Claims: ``sub`` user id, ``role``, ``shop`` (the tenant; "" for customers;
staff and workers always name one, "*" for all shops only when asked for
explicitly: admins and global workers), ``iat`` and ``exp`` (unix seconds),
``jti`` (a unique id), ``once`` and, for workers, ``plugin`` (the plugin the
token may join as). A token with ``once`` set is single use:
its jti is remembered until it expires and a second Hello with it is refused
as a replay. The server also stores each used jti (``PutUsedToken``) and
reloads the unexpired ones at start (``remember_used``), so a restart does not
make a used token valid again. Shop backends mint such short-lived tokens for each connect;
``imserver token`` mints them for development.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from typing import Final

import msgspec

from protocol import Role

from .limits import MAX_TOKEN_TTL_S, TOKEN_REPLAY_CACHE


class Claims(msgspec.Struct, kw_only=True, frozen=True):
    sub: str
    role: Role
    shop: str
    iat: int
    exp: int
    jti: str
    once: bool = False
    plugin: str = ""


class TokenError(Exception):
    """The token is not acceptable; the message says why (for the Error frame)."""


_claims_decoder: Final = msgspec.msgpack.Decoder(Claims)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _claims_problem(role: Role, shop: str, plugin: str) -> str:
    """Why this role, shop and plugin do not fit together ("" if they do)."""
    if role is Role.CUSTOMER:
        return "customer tokens carry no shop" if shop else ""
    if role in (Role.AGENT, Role.SUPERVISOR) and shop in ("", "*"):
        return f"{role} tokens name their shop"
    if role is Role.WORKER and not shop:
        return "worker tokens name their shop ('*' for all shops)"
    if role is Role.ADMIN and shop != "*":
        return "admin tokens are for all shops (shop '*')"
    if plugin and role is not Role.WORKER:
        return "only worker tokens name a plugin"
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
    """A signed token. Staff and worker tokens must name their shop: all-shops
    power (shop "*") is never a default, so shop "" is refused for them."""
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
    body = _b64(msgspec.msgpack.encode(claims))
    sig = hmac.new(secret, body.encode("ascii"), hashlib.sha256).digest()
    return f"{body}.{_b64(sig)}"


class TokenVerifier:
    """Checks signature, expiry and single use. ``now`` is unix seconds."""

    def __init__(self, secret: bytes, *, replay_cache: int = TOKEN_REPLAY_CACHE) -> None:
        if len(secret) < 16:
            raise ValueError("the token secret must be at least 16 bytes")
        self._secret = secret
        self._used: OrderedDict[str, int] = OrderedDict()  # jti -> exp, oldest first
        self._replay_cache = replay_cache

    def verify(self, token: str, now: float | None = None) -> Claims:
        now = time.time() if now is None else now
        body, dot, sig = token.partition(".")
        if not dot or not body or not sig:
            raise TokenError("malformed token")
        try:
            given = _unb64(sig)
        except ValueError:
            raise TokenError("malformed token signature") from None
        expected = hmac.new(self._secret, body.encode("ascii", "replace"), hashlib.sha256).digest()
        if not hmac.compare_digest(given, expected):
            raise TokenError("bad token signature")
        try:
            claims = _claims_decoder.decode(_unb64(body))
        except (ValueError, msgspec.DecodeError):
            raise TokenError("malformed token claims") from None
        if claims.exp <= now:
            raise TokenError("token expired")
        if claims.exp - claims.iat > MAX_TOKEN_TTL_S:
            raise TokenError("token lifetime over the maximum")
        if claims.iat > now + 300:
            raise TokenError("token issued in the future")
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
