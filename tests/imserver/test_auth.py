"""Tokens: standard JWTs. What ``mint_token`` and ``imserver token`` refuse to
mint, what the verifier refuses to accept (hostile input: forged, tampered,
confused, non-canonical, foreign shop keys), and shop JWKS files (rotation)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from imserver.auth import ShopKeys, TokenError, TokenVerifier, load_jwks, mint_token
from imserver.cli import main
from imserver.client import ServerError, connect
from imserver.limits import JWKS_RECHECK_S, MAX_TOKEN_TTL_S, TOKEN_CLOCK_SKEW_S
from imserver.server import Server, ServerConfig
from protocol import ErrorCode, OpenConversation, Role
from tests.conftest import SECRET, SHOPS

NOW = 1_800_000_000
LENIENT: Final[jwt.types.Options] = {"verify_exp": False, "verify_iat": False}
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(private: PrivateKey, kid: str, **extra: object) -> dict[str, Any]:
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
    elif isinstance(public, ed25519.Ed25519PublicKey):
        jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(public))
    else:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
    return {**jwk, "kid": kid, **extra}


def _write_jwks(path: Path, *keys: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"keys": list(keys)}))
    return path


def _claims(**over: object) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "sub": "shop1:alice",
        "role": "customer",
        "shop": "shop1",
        "iat": NOW,
        "exp": NOW + 600,
        "jti": "j-1",
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def _shop_token(private: PrivateKey, kid: str, alg: str, **over: object) -> str:
    return jwt.encode(_claims(**over), private, algorithm=alg, headers={"kid": kid})


def _platform_token(**over: object) -> str:
    """Signed with the server secret, but made by hand as any issuer could."""
    return jwt.encode(_claims(**({"sub": "alice", "shop": ""} | over)), SECRET, algorithm="HS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _raw(header: dict[str, Any] | bytes, payload: dict[str, Any] | bytes, sig: bytes = b"") -> str:
    """A compact JWS from parts, signed with the server secret unless ``sig``."""
    import hashlib
    import hmac

    head = _b64(header if isinstance(header, bytes) else json.dumps(header).encode())
    body = _b64(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    sig = sig or hmac.new(SECRET, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def tick(self) -> None:
        self.t += JWKS_RECHECK_S


@pytest.fixture
def shop_env(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> tuple[TokenVerifier, dict[str, Any]]:
    """shop1 signs with an RSA key (kid r1) and an Ed25519 key (kid e1); shop2
    with its own Ed25519 key, whose kid is also "r1" (kids are per shop)."""
    ed1, ed2 = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    _write_jwks(tmp_path / "jwks" / "shop1.json", _jwk(rsa_key, "r1", alg="RS256"), _jwk(ed1, "e1"))
    _write_jwks(tmp_path / "jwks" / "shop2.json", _jwk(ed2, "r1"))
    keys = ShopKeys(directory=tmp_path / "jwks")
    assert keys.shops == ["shop1", "shop2"]
    return TokenVerifier(SECRET, shop_keys=keys), {"rsa": rsa_key, "ed1": ed1, "ed2": ed2}


# --- minting -------------------------------------------------------------------------------


def test_minted_tokens_are_standard_jwts() -> None:
    token = mint_token(SECRET, user="a1", role="agent", shop="s1", now=NOW, ttl_s=60)
    decoded = jwt.decode(token, SECRET, algorithms=["HS256"], options=LENIENT)
    assert decoded == {
        "sub": "a1",
        "role": "agent",
        "shop": "s1",
        "iat": NOW,
        "exp": NOW + 60,
        "jti": decoded["jti"],
    }  # defaults (once, plugin) are left out
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    claims = TokenVerifier(SECRET).verify(token, now=NOW + 30)
    assert (claims.sub, claims.role, claims.shop, claims.once) == ("a1", Role.AGENT, "s1", False)


@pytest.mark.parametrize("role", ["agent", "supervisor", "worker", "admin"])
def test_staff_and_worker_tokens_never_default_to_all_shops(role: str) -> None:
    with pytest.raises(ValueError, match="shop"):
        mint_token(SECRET, user="x", role=role)


def test_all_shops_is_explicit_and_plugin_is_carried() -> None:
    verifier = TokenVerifier(SECRET)
    claims = verifier.verify(mint_token(SECRET, user="w", role="worker", shop="*", plugin="crm"))
    assert (claims.role, claims.shop, claims.plugin) == (Role.WORKER, "*", "crm")
    assert verifier.verify(mint_token(SECRET, user="w", role="worker", shop="s1")).plugin == ""
    with pytest.raises(ValueError, match="plugin"):
        mint_token(SECRET, user="a", role="agent", shop="s1", plugin="crm")
    with pytest.raises(ValueError, match="shop"):
        mint_token(SECRET, user="a", role="agent", shop="*")
    with pytest.raises(ValueError, match="admin"):
        mint_token(SECRET, user="root", role="admin", shop="s1")
    with pytest.raises(ValueError, match="customer"):
        mint_token(SECRET, user="c", role="customer", shop="*")
    with pytest.raises(ValueError, match="plugin"):
        mint_token(SECRET, user="c", role="customer", plugin="crm")


def _cli_token(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["token", "--data", str(tmp_path), *args])
    out, err = capsys.readouterr()
    return code, out.strip() if code == 0 else err


def test_token_command_requires_a_shop_or_all_shops_for_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _cli_token(tmp_path, capsys, "--role", "worker", "w1")
    assert code == 2 and "--all-shops" in err
    code, err = _cli_token(tmp_path, capsys, "--role", "worker", "--shop", "*", "w1")
    assert code == 2 and "--all-shops" in err
    code, err = _cli_token(tmp_path, capsys, "--role", "agent", "--all-shops", "a1")
    assert code == 2 and "worker and admin" in err
    verifier = TokenVerifier((tmp_path / "secret").read_bytes().strip())
    code, token = _cli_token(
        tmp_path, capsys, "--role", "worker", "--shop", "s2", "--plugin", "crm", "w1"
    )
    assert code == 0
    claims = verifier.verify(token)
    assert (claims.sub, claims.role, claims.shop, claims.plugin) == ("w1", Role.WORKER, "s2", "crm")
    code, token = _cli_token(tmp_path, capsys, "--role", "admin", "--all-shops", "root")
    assert code == 0 and verifier.verify(token).shop == "*"
    code, token = _cli_token(tmp_path, capsys, "--shop", "s1", "c1")  # a buyer of s1 only
    assert code == 0 and verifier.verify(token).shop == "s1"
    code, token = _cli_token(tmp_path, capsys, "c1")
    assert code == 0 and verifier.verify(token).shop == ""


def test_the_secret_is_long_enough_for_hs256() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        TokenVerifier(b"x" * 31)


# --- platform tokens (HS256, server secret): hostile input ----------------------------------


def test_platform_token_checks() -> None:
    verifier = TokenVerifier(SECRET)
    token = mint_token(SECRET, user="a1", role="agent", shop="s1", now=NOW, ttl_s=60)
    with pytest.raises(TokenError, match="expired"):
        verifier.verify(token, now=NOW + 60)
    with pytest.raises(TokenError, match="signature"):
        TokenVerifier(SECRET + b"!").verify(token, now=NOW)
    long_lived = mint_token(SECRET, user="u", role="customer", now=NOW, ttl_s=MAX_TOKEN_TTL_S + 1)
    with pytest.raises(TokenError, match="lifetime"):
        verifier.verify(long_lived, now=NOW)
    ahead = NOW + TOKEN_CLOCK_SKEW_S
    assert verifier.verify(_platform_token(iat=ahead, exp=ahead + 60), now=NOW).iat == ahead
    with pytest.raises(TokenError, match="future"):
        verifier.verify(_platform_token(iat=ahead + 1, exp=ahead + 60), now=NOW)
    with pytest.raises(TokenError, match="nbf"):
        verifier.verify(_platform_token(nbf=ahead + 1), now=NOW)
    for role, shop in [("agent", ""), ("supervisor", "*"), ("worker", ""), ("admin", "s1")]:
        with pytest.raises(TokenError, match="shop"):
            verifier.verify(_platform_token(role=role, shop=shop), now=NOW)
    for role, shop in [("agent", "s1"), ("customer", ""), ("admin", "*")]:
        with pytest.raises(TokenError, match="plugin"):
            verifier.verify(_platform_token(role=role, shop=shop, plugin="crm"), now=NOW)


def test_single_use_tokens_are_refused_when_replayed() -> None:
    verifier = TokenVerifier(SECRET)
    once = mint_token(SECRET, user="c1", role="customer", now=NOW, once=True)
    verifier.verify(once, now=NOW + 1)
    with pytest.raises(TokenError, match="replayed"):
        verifier.verify(once, now=NOW + 2)
    restarted = TokenVerifier(SECRET)
    claims = jwt.decode(once, options={"verify_signature": False})
    restarted.remember_used(claims["jti"], claims["exp"])
    with pytest.raises(TokenError, match="replayed"):
        restarted.verify(once, now=NOW + 3)


@pytest.mark.parametrize("missing", ["sub", "role", "iat", "exp", "jti"])
def test_required_claims(missing: str) -> None:
    with pytest.raises(TokenError, match="claims"):
        TokenVerifier(SECRET).verify(_platform_token(**{missing: None}), now=NOW)


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("iat", "1800000000"),
        ("exp", 1800000600.5),
        ("exp", True),
        ("role", "root"),
        ("sub", ""),
        ("sub", 7),
        ("jti", ""),
        ("once", "yes"),
        ("shop", None),
    ],
)
def test_claims_are_typed(claim: str, value: object) -> None:
    verifier = TokenVerifier(SECRET)
    token = _platform_token(**{claim: value})
    if value is None:  # shop may be left out (a platform buyer): no error
        assert verifier.verify(token, now=NOW).shop == ""
        return
    with pytest.raises(TokenError, match="claims"):
        verifier.verify(token, now=NOW)


def _flip_last_char(text: str) -> str:
    return text[:-1] + ("A" if text[-1] != "A" else "B")


HEADER = {"alg": "HS256", "typ": "JWT"}
PAYLOAD = _claims(sub="alice", shop="")


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        (
            "alg none, empty signature",
            lambda: jwt.encode(PAYLOAD, "", algorithm="none"),
            "malformed",
        ),
        ("alg none, any signature", lambda: _raw({"alg": "none"}, PAYLOAD), "algorithm"),
        ("alg missing", lambda: _raw({"typ": "JWT"}, PAYLOAD), "header"),
        ("unknown alg", lambda: _raw({"alg": "HS999"}, PAYLOAD), "algorithm"),
        ("another HMAC", lambda: jwt.encode(PAYLOAD, SECRET * 2, algorithm="HS512"), "algorithm"),
        ("RS256 without a kid", lambda: _raw({"alg": "RS256"}, PAYLOAD), "algorithm"),
        (
            "tampered claims",
            lambda: ".".join(
                [
                    (t := _platform_token()).split(".")[0],
                    _b64(json.dumps(_claims(sub="alice", shop="", role="admin")).encode()),
                    t.split(".")[2],
                ]
            ),
            "signature",
        ),
        ("tampered signature", lambda: _flip_last_char(_platform_token()), "signature|canonical"),
        ("padding", lambda: _platform_token() + "=", "malformed"),
        (
            "padded claims",
            lambda: _raw(
                HEADER,
                b'{"sub":"a","role":"customer","iat":1800000000,"exp":1800000600,"jti":"j-1"}',
            ).replace(".", "=.", 1),
            "malformed",
        ),
        ("whitespace", lambda: " " + _platform_token(), "malformed"),
        ("line break", lambda: _platform_token().replace(".", ".\n", 1), "malformed"),
        (
            "base64 not url",
            lambda: _platform_token().replace("-", "+").replace("_", "/") + "+/",
            "malformed",
        ),
        ("four segments", lambda: _platform_token() + ".AAAA", "malformed"),
        ("empty", lambda: "", "malformed"),
        (
            "non-canonical trailing bits",
            # 32 signature bytes = 43 characters, the last of which carries 2 unused bits
            lambda: (
                (t := _platform_token())[:-1]
                + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[
                    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(t[-1])
                    | 1
                ]
            ),
            "canonical|signature",
        ),
        (
            "duplicate claim",
            lambda: _raw(
                HEADER,
                b'{"sub":"alice","role":"customer","role":"admin",'
                b'"shop":"*","iat":1800000000,"exp":1800000600,'
                b'"jti":"j-1"}',
            ),
            "duplicate",
        ),
        (
            "duplicate header key",
            lambda: _raw(b'{"alg":"none","alg":"HS256"}', PAYLOAD),
            "duplicate",
        ),
        ("claims not JSON", lambda: _raw(HEADER, b"\x93\xa3sub"), "claims"),
        ("claims a list", lambda: _raw(HEADER, b"[1,2]"), "claims"),
        ("deep nesting", lambda: _raw(HEADER, b"[" * 5000 + b"]" * 5000), "claims"),
        (
            "crit extension",
            lambda: _raw({"alg": "HS256", "crit": ["exp"], "exp": 1}, PAYLOAD),
            "critical|malformed",
        ),
    ],
)
def test_hostile_platform_tokens(name: str, make: Callable[[], str], reason: str) -> None:
    with pytest.raises(TokenError, match=reason):
        TokenVerifier(SECRET).verify(make(), now=NOW)


def test_what_pyjwt_alone_would_accept() -> None:
    """Why the verifier checks the form itself: PyJWT accepts these variants of
    a valid token (one token, several texts) and keeps the last of duplicate keys."""
    token = _platform_token()
    assert jwt.decode(token + "=", SECRET, algorithms=["HS256"], options=LENIENT)
    duplicate = _raw(
        HEADER,
        b'{"sub":"alice","role":"customer","role":"admin","iat":1800000000,'
        b'"exp":1800000600,"jti":"j-1"}',
    )
    decoded = jwt.decode(duplicate, SECRET, algorithms=["HS256"], options=LENIENT)
    assert decoded["role"] == "admin"


# --- shop keys (RS256 / EdDSA from the shop's JWKS) ------------------------------------------


def test_shop_keys_vouch_for_their_own_shop(shop_env: tuple[TokenVerifier, dict[str, Any]]) -> None:
    verifier, keys = shop_env
    buyer = verifier.verify(_shop_token(keys["rsa"], "r1", "RS256"), now=NOW)
    assert (buyer.sub, buyer.role, buyer.shop) == ("shop1:alice", Role.CUSTOMER, "shop1")
    agent = verifier.verify(
        _shop_token(keys["ed1"], "e1", "EdDSA", sub="shop1:a7", role="agent", jti="j-2"), now=NOW
    )
    assert (agent.role, agent.shop) == (Role.AGENT, "shop1")
    bot = verifier.verify(
        _shop_token(
            keys["ed2"],
            "r1",
            "EdDSA",
            sub="shop2:bot",
            role="worker",
            shop="shop2",
            plugin="faq",
            jti="j-3",
        ),
        now=NOW,
    )
    assert (bot.shop, bot.plugin) == ("shop2", "faq")


@pytest.mark.parametrize(
    ("name", "over", "reason"),
    [
        # shop1's key claiming shop2: only shop2's keys are tried (its kid r1 is an EdDSA key)
        ("buyer of another shop", {"shop": "shop2", "sub": "shop2:alice"}, "algorithm"),
        (
            "staff of another shop",
            {"shop": "shop2", "sub": "shop2:a1", "role": "supervisor"},
            "algorithm",
        ),
        ("a shop with no keys", {"shop": "shop3", "sub": "shop3:alice"}, "unknown token key"),
        ("all shops", {"shop": "*", "sub": "*:w", "role": "worker"}, "unknown token key"),
        ("no shop", {"shop": None, "sub": "alice"}, "unknown token key"),
        ("admin", {"role": "admin", "sub": "shop1:root"}, "admin"),
        ("a platform user", {"sub": "alice"}, "names users 'shop1:"),
        ("another shop's user", {"sub": "shop2:alice"}, "names users 'shop1:"),
        ("expired", {"exp": NOW}, "expired"),
        ("too long", {"exp": NOW + MAX_TOKEN_TTL_S + 1}, "lifetime"),
    ],
)
def test_a_shop_key_cannot_reach_beyond_its_shop(
    shop_env: tuple[TokenVerifier, dict[str, Any]], name: str, over: dict[str, object], reason: str
) -> None:
    verifier, keys = shop_env
    with pytest.raises(TokenError, match=reason):
        verifier.verify(_shop_token(keys["rsa"], "r1", "RS256", **over), now=NOW)


def test_algorithm_confusion_and_forgery_with_shop_keys(
    shop_env: tuple[TokenVerifier, dict[str, Any]], rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier, keys = shop_env
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": "r1"}
    body = _b64(json.dumps(_claims()).encode())
    import hashlib
    import hmac

    for secret in (public_pem, json.dumps(_jwk(rsa_key, "r1")).encode(), SECRET):
        head = _b64(json.dumps(header).encode())
        sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
        with pytest.raises(TokenError, match="algorithm"):  # the key r1 verifies RS256 only
            verifier.verify(f"{head}.{body}.{_b64(sig)}", now=NOW)
    # the same confusion without a kid: the server secret verifies, and fails
    head = _b64(json.dumps({"alg": "HS256"}).encode())
    sig = hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    with pytest.raises(TokenError, match="signature"):
        verifier.verify(f"{head}.{body}.{_b64(sig)}", now=NOW)
    # RS256 header on the EdDSA key, a key signing under another shop's kid, an unknown kid
    with pytest.raises(TokenError, match="algorithm"):
        verifier.verify(_shop_token(keys["rsa"], "e1", "RS256"), now=NOW)
    with pytest.raises(TokenError, match="signature"):
        verifier.verify(_shop_token(keys["ed2"], "e1", "EdDSA"), now=NOW)
    with pytest.raises(TokenError, match="unknown token key"):
        verifier.verify(_shop_token(keys["rsa"], "r2", "RS256"), now=NOW)
    # a key of the attacker's own, offered in the header (jwk, jku): never used
    mallory = ed25519.Ed25519PrivateKey.generate()
    offered = {"kid": "e1", "jwk": _jwk(mallory, "e1"), "jku": "http://127.0.0.1:9/jwks"}
    with pytest.raises(TokenError, match="signature"):
        verifier.verify(jwt.encode(_claims(), mallory, algorithm="EdDSA", headers=offered), now=NOW)
    with pytest.raises(TokenError, match="no shop keys"):
        TokenVerifier(SECRET).verify(_shop_token(keys["rsa"], "r1", "RS256"), now=NOW)


def test_jwks_rotation_and_withdrawal(tmp_path: Path) -> None:
    """Publish the new key beside the old, move issuers over, drop the old:
    each step takes effect within JWKS_RECHECK_S, without a restart."""
    old, new = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    path = _write_jwks(tmp_path / "shop1.json", _jwk(old, "2026-01"))
    clock = Clock()
    verifier = TokenVerifier(SECRET, shop_keys=ShopKeys({"shop1": path}, clock=clock))

    def check(key: ed25519.Ed25519PrivateKey, kid: str) -> None:
        verifier.verify(_shop_token(key, kid, "EdDSA"), now=NOW)

    check(old, "2026-01")
    with pytest.raises(TokenError, match="unknown"):
        check(new, "2026-02")
    _write_jwks(path, _jwk(old, "2026-01"), _jwk(new, "2026-02"))
    clock.tick()
    check(old, "2026-01")
    check(new, "2026-02")
    _write_jwks(path, _jwk(new, "2026-02"))
    clock.tick()
    check(new, "2026-02")
    with pytest.raises(TokenError, match="unknown"):
        check(old, "2026-01")
    path.write_text("{not json")  # a broken file fails closed
    clock.tick()
    with pytest.raises(TokenError, match="unknown"):
        check(new, "2026-02")


def test_jwks_directory_picks_up_and_drops_shops(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    clock = Clock()
    verifier = TokenVerifier(SECRET, shop_keys=ShopKeys(directory=tmp_path / "jwks", clock=clock))
    token = _shop_token(key, "k", "EdDSA")
    with pytest.raises(TokenError, match="unknown"):
        verifier.verify(token, now=NOW)
    _write_jwks(tmp_path / "jwks" / "shop1.json", _jwk(key, "k"))
    _write_jwks(tmp_path / "jwks" / "bad:shop.json", _jwk(key, "k"))  # skipped: not a shop id
    clock.tick()
    assert verifier.verify(token, now=NOW).shop == "shop1"
    (tmp_path / "jwks" / "shop1.json").unlink()
    clock.tick()
    with pytest.raises(TokenError, match="unknown"):
        verifier.verify(token, now=NOW)


@pytest.mark.parametrize(
    ("name", "jwks", "reason"),
    [
        (
            "private key",
            lambda k, r: {
                "keys": [json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(k)) | {"kid": "a"}]
            },
            "private",
        ),
        (
            "symmetric key",
            lambda k, r: {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "a"}]},
            "secret",
        ),
        ("no kid", lambda k, r: {"keys": [_jwk(k, "a") | {"kid": ""}]}, "kid"),
        ("same kid twice", lambda k, r: {"keys": [_jwk(k, "a"), _jwk(r, "a")]}, "kid"),
        ("HS256 alg", lambda k, r: {"keys": [_jwk(r, "a", alg="HS256")]}, "alg"),
        ("RS512 alg", lambda k, r: {"keys": [_jwk(r, "a", alg="RS512")]}, "alg"),
        ("encryption key", lambda k, r: {"keys": [_jwk(k, "a", use="enc")]}, "signing"),
        (
            "short RSA",
            lambda k, r: {
                "keys": [_jwk(rsa.generate_private_key(public_exponent=65537, key_size=1024), "a")]
            },
            "2048|short|length",
        ),
        (
            "P-384 (ES384)",
            lambda k, r: {"keys": [_jwk(ec.generate_private_key(ec.SECP384R1()), "a")]},
            "not allowed",
        ),
        ("no keys", lambda k, r: {"keys": []}, "keys"),
        ("too many keys", lambda k, r: {"keys": [_jwk(k, str(i)) for i in range(17)]}, "keys"),
        ("not an object", lambda k, r: [1], "keys"),
    ],
)
def test_jwks_files_are_strict(
    rsa_key: rsa.RSAPrivateKey, name: str, jwks: Callable[..., object], reason: str
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(ValueError, match=reason):
        load_jwks(json.dumps(jwks(key, rsa_key)).encode())


class JwksEndpoint:
    """A shop's JWKS over HTTP on 127.0.0.1 (a real socket, served by a thread)."""

    def __init__(self) -> None:
        import http.server
        import threading

        endpoint = self
        self.body = b"{}"
        self.status = 200

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(endpoint.status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(endpoint.body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, *keys: dict[str, Any]) -> None:
        self.body = json.dumps({"keys": list(keys)}).encode()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def endpoint() -> Iterator[JwksEndpoint]:
    served = JwksEndpoint()
    yield served
    served.close()


async def test_jwks_url_is_fetched_refreshed_and_kept_on_failure(endpoint: JwksEndpoint) -> None:
    old, new = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    endpoint.publish(_jwk(old, "old"))
    keys = ShopKeys(urls={"shop1": endpoint.url})
    verifier = TokenVerifier(SECRET, shop_keys=keys)
    async with trio.open_nursery() as nursery:
        await nursery.start(keys.run)  # returns after the first fetch
        assert verifier.verify(_shop_token(old, "old", "EdDSA"), now=NOW).shop == "shop1"
        endpoint.publish(_jwk(old, "old"), _jwk(new, "new"))
        with pytest.raises(TokenError, match="unknown"):  # not fetched yet
            verifier.verify(_shop_token(new, "new", "EdDSA"), now=NOW)
        await keys.refresh_urls()
        verifier.verify(_shop_token(new, "new", "EdDSA", jti="j-2"), now=NOW)
        endpoint.status = 500  # the endpoint fails: the last good keys stay
        await keys.refresh_urls()
        verifier.verify(_shop_token(new, "new", "EdDSA", jti="j-3"), now=NOW)
        endpoint.status = 200
        endpoint.publish(_jwk(new, "new"))  # the old key withdrawn
        await keys.refresh_urls()
        with pytest.raises(TokenError, match="unknown"):
            verifier.verify(_shop_token(old, "old", "EdDSA", jti="j-4"), now=NOW)
        nursery.cancel_scope.cancel()


def test_jwks_urls_are_http_only() -> None:
    with pytest.raises(ValueError, match="scheme"):
        ShopKeys(urls={"shop1": "file:///etc/passwd"})


def test_jwks_accepts_es256(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = _write_jwks(tmp_path / "s.json", _jwk(key, "p256"))
    verifier = TokenVerifier(SECRET, shop_keys=ShopKeys({"shop1": path}))
    assert verifier.verify(_shop_token(key, "p256", "ES256"), now=NOW).sub == "shop1:alice"


def test_shop_keys_refuse_bad_configuration(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    good = _write_jwks(tmp_path / "good.json", _jwk(key, "k"))
    for shop in ("*", "", "a:b"):
        with pytest.raises(ValueError, match="cannot hold keys"):
            ShopKeys({shop: good})
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="JSON"):
        ShopKeys({"shop1": tmp_path / "broken.json"})
    with pytest.raises(ValueError, match="No such file"):
        ShopKeys({"shop1": tmp_path / "missing.json"})


def test_serve_refuses_a_broken_jwks_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "jwks").mkdir()
    (tmp_path / "jwks" / "shop1.json").write_text(
        '{"keys": [{"kty": "oct", "k": "x", "kid": "a"}]}'
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "imserver",
            "serve",
            "--data",
            str(tmp_path),
            "--port",
            "0",
            "--secret",
            SECRET.decode(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "shop1.json" in done.stderr, done.stderr


async def test_a_shop_signed_buyer_connects_and_a_foreign_one_is_refused(tmp_path: Path) -> None:
    """Real server, real sockets: shop1's backend signs its buyer's token with its
    own key; that buyer deals with shop1 only, and the same key cannot get a
    buyer of shop2 in."""
    key = ed25519.Ed25519PrivateKey.generate()
    path = _write_jwks(tmp_path / "shop1.json", _jwk(key, "k1"))
    server = Server(
        ServerConfig(
            data_dir=tmp_path / "data",
            secret=SECRET,
            port=0,
            shops=SHOPS,
            jwks={"shop1": str(path)},
        )
    )
    t = int(time.time())  # the server verifies against its own clock
    async with trio.open_nursery() as nursery:
        url = await nursery.start(server.serve)
        own = _shop_token(key, "k1", "EdDSA", iat=t, exp=t + 60)
        async with connect(url, own, device="d1") as client:
            assert (client.welcome.user, client.welcome.shop) == ("shop1:alice", "shop1")
            info = await client.request(OpenConversation(id=0, shop="shop1"))
            assert info.conversation.customer == "shop1:alice"
            with pytest.raises(ServerError) as elsewhere:  # a buyer of shop1 only
                await client.request(OpenConversation(id=0, shop="shop2"))
            assert elsewhere.value.code == ErrorCode.FORBIDDEN
        foreign = _shop_token(
            key, "k1", "EdDSA", iat=t, exp=t + 60, shop="shop2", sub="shop2:alice", jti="j-2"
        )
        with pytest.raises(ServerError) as refused:
            async with connect(url, foreign, device="d2"):
                pass
        assert refused.value.code == ErrorCode.UNAUTHORIZED
        server.stop()


# --- docs/PROTOCOL.md ------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def test_the_worked_example_token_is_genuine() -> None:
    text = DOC.read_text(encoding="utf-8")
    line = text[text.index("Token (HS256, secret `") :].split("\n", 1)[0]
    secret = line.split("`")[1].encode()
    token = text[text.index("```text\n", text.index(line)) + 8 :].split("\n", 1)[0]
    claims = TokenVerifier(secret).verify(token, now=1732406400)
    stated = json.loads(line[line.index('claims {"') + 7 : line.index("}:") + 1])
    assert jwt.decode(token, secret, algorithms=["HS256"], options=LENIENT) == stated
    assert (claims.sub, claims.role, claims.shop) == ("cust-1001", Role.CUSTOMER, "")
    assert f'"token": "{token}"' in text  # the Hello dumps carry this token


def test_the_shop_minting_example_works(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = DOC.read_text(encoding="utf-8")
    start = text.index("```python\n", text.index("**Minting with a shop key**")) + 10
    example: dict[str, Any] = {}
    exec(text[start : text.index("```", start)], example)  # the documented code, as written
    jwk = json.loads(capsys.readouterr().out) | {"kid": "2026-11"}
    _write_jwks(tmp_path / "jwks" / "shop-42.json", jwk)
    verifier = TokenVerifier(SECRET, shop_keys=ShopKeys(directory=tmp_path / "jwks"))
    token = example["buyer_token"]("cust-1001")
    claims = verifier.verify(token)
    assert (claims.sub, claims.shop, claims.once) == ("shop-42:cust-1001", "shop-42", True)
    with pytest.raises(TokenError, match="replayed"):
        verifier.verify(token)
