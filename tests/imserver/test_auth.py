"""Tokens: what ``mint_token`` and ``imserver token`` refuse to mint, and what
the verifier refuses to accept."""

from __future__ import annotations

from pathlib import Path

import pytest

from imserver.auth import TokenError, TokenVerifier, mint_token
from imserver.cli import main
from protocol import Role
from tests.conftest import SECRET


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


def _sign_raw(**claims: object) -> str:
    """A token signed with the server secret but not made by ``mint_token``:
    what a careless or hostile issuer could produce."""
    import base64
    import hashlib
    import hmac

    import msgspec

    body = base64.urlsafe_b64encode(msgspec.msgpack.encode(claims)).rstrip(b"=")
    sig = base64.urlsafe_b64encode(hmac.new(SECRET, body, hashlib.sha256).digest()).rstrip(b"=")
    return f"{body.decode()}.{sig.decode()}"


def test_tokens() -> None:
    verifier = TokenVerifier(SECRET)
    token = mint_token(SECRET, user="a1", role="agent", shop="s1", now=1000, ttl_s=60)
    claims = verifier.verify(token, now=1030)
    assert (claims.sub, claims.role, claims.shop) == ("a1", Role.AGENT, "s1")
    with pytest.raises(TokenError, match="expired"):
        verifier.verify(token, now=1061)
    with pytest.raises(TokenError, match="signature"):
        TokenVerifier(b"another-secret-0123456789").verify(token, now=1030)
    with pytest.raises(TokenError, match="malformed"):
        verifier.verify("no-dot-here", now=1030)
    base = {"sub": "x", "iat": 1000, "exp": 2000, "jti": "j1", "once": False}
    for role, shop in [("agent", ""), ("supervisor", "*"), ("worker", ""), ("admin", "s1")]:
        with pytest.raises(TokenError, match="shop"):
            verifier.verify(_sign_raw(**base, role=role, shop=shop), now=1030)
    with pytest.raises(TokenError, match="plugin"):
        verifier.verify(_sign_raw(**base, role="agent", shop="s1", plugin="crm"), now=1030)
    with pytest.raises(TokenError, match="lifetime"):
        verifier.verify(
            mint_token(SECRET, user="u", role="customer", now=1000, ttl_s=400 * 86400), now=1030
        )
    once = mint_token(SECRET, user="c1", role="customer", now=1000, once=True)
    verifier.verify(once, now=1030)
    with pytest.raises(TokenError, match="replayed"):
        verifier.verify(once, now=1031)
    with pytest.raises(ValueError, match="16 bytes"):
        TokenVerifier(b"short")
