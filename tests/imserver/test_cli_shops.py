"""``imserver shop add|list`` and ``serve --shops``: the shop registry from the
command line (in-process ``main``, a real data directory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imserver.cli import build_parser, main
from imserver.server import DB_FILE
from imserver.store import read_shops


def test_shop_add_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert main(["shop", "list", "--data", str(data)]) == 2  # no database yet
    assert main(["shop", "add", "--data", str(data), "shop1", "shop2"]) == 0
    assert main(["shop", "add", "--data", str(data), "shop2", "shop3"]) == 0
    capsys.readouterr()
    assert main(["shop", "list", "--data", str(data)]) == 0
    assert capsys.readouterr().out.split() == ["shop1", "shop2", "shop3"]


@pytest.mark.parametrize("name", ["*", "", "bad\nname", "x" * 129])
def test_shop_add_refuses_what_is_not_a_shop_id(tmp_path: Path, name: str) -> None:
    data = tmp_path / "data"
    assert main(["shop", "add", "--data", str(data), "ok", name]) == 2
    assert not (data / DB_FILE).exists() or read_shops(data / DB_FILE) == []


def test_serve_takes_its_shops_from_flag_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from imserver.cli import _shop_names

    assert _shop_names(build_parser().parse_args(["serve", "--shops", "a, b,a"]).shops) == (
        "a",
        "b",
    )
    monkeypatch.setenv("IMSERVER_SHOPS", "x,y")
    assert _shop_names(build_parser().parse_args(["serve"]).shops) == ("x", "y")
    with pytest.raises(SystemExit):
        _shop_names("ok,*")
