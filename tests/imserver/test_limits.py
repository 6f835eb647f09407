"""Every limit is a named constant in one place, and the README shows them all."""

from pathlib import Path

from imserver.limits import markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_limits_table_is_current() -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- limits:start")
    table = text[text.index("\n", start) + 1 : text.index("<!-- limits:end -->")].strip()
    assert table == markdown_table(), "run: python -m imserver.limits, paste into README.md"


def test_every_limit_is_documented() -> None:
    undocumented = [
        row.split("|")[1].strip()
        for row in markdown_table().splitlines()[2:]
        if not row.split("|")[3].strip()
    ]
    assert undocumented == []
