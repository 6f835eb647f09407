"""Operations: ``--version``, the LICENSE, and the deployment files in ``deploy/``
agreeing with the code they run (flags, environment variables, the drain bound).

The container image and the systemd unit are not started here (no Docker or
systemd in the test environment); what can drift silently is checked instead.
"""

from __future__ import annotations

import configparser
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from imserver.cli import build_parser
from imserver.limits import (
    CLOSE_LINGER_S,
    CLOSE_SEND_TIMEOUT_S,
    DRAIN_TIMEOUT_S,
    MAX_CONNECTIONS,
)
from imserver.supervisor import STOP_GRACE_S

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

STOP_BOUND_S = DRAIN_TIMEOUT_S + CLOSE_SEND_TIMEOUT_S + CLOSE_LINGER_S + 1 + STOP_GRACE_S
"""Longest a SIGTERM'd server takes: the drain, the close handshakes' cut-off,
then its worker children's stop grace."""


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read_string((DEPLOY / "imserver.service").read_text(encoding="utf-8"))
    return unit


def _compose_service() -> dict[str, object]:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    service: dict[str, object] = compose["services"]["imserver"]
    return service


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)?", text.strip())
    assert match, text
    return float(match.group(1)) * (60 if match.group(2) == "m" else 1)


def test_version_is_the_package_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "imserver", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == f"imserver {PYPROJECT['project']['version']}"


def test_license_file_matches_pyproject() -> None:
    assert PYPROJECT["project"]["license"] == {"text": "MIT"}
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n")
    assert "Permission is hereby granted, free of charge" in text


def test_stop_timeouts_cover_the_drain() -> None:
    service = _unit()["Service"]
    assert service["KillSignal"] == "SIGTERM"
    assert _seconds(service["TimeoutStopSec"]) >= STOP_BOUND_S
    compose = _compose_service()
    assert compose["stop_signal"] == "SIGTERM"
    assert _seconds(str(compose["stop_grace_period"])) >= STOP_BOUND_S
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^STOPSIGNAL SIGTERM$", dockerfile, re.MULTILINE)


def test_descriptor_limits_allow_max_connections() -> None:
    assert int(_unit()["Service"]["LimitNOFILE"]) > MAX_CONNECTIONS
    ulimits = _compose_service()["ulimits"]
    assert isinstance(ulimits, dict)
    assert ulimits["nofile"]["soft"] > MAX_CONNECTIONS


def test_commands_parse_with_the_real_cli() -> None:
    exec_start = shlex.split(_unit()["Service"]["ExecStart"])
    assert exec_start[0].endswith("/imserver")
    assert build_parser().parse_args(exec_start[1:]).command == "serve"
    command = _compose_service()["command"]
    assert isinstance(command, list)
    args = build_parser().parse_args(command)
    assert args.command == "serve" and args.workers == "bot,routing,crm"
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert 'ENTRYPOINT ["imserver"]' in dockerfile and 'CMD ["serve"]' in dockerfile
    assert "/healthz" in dockerfile


def test_environment_variables_are_ones_the_cli_reads() -> None:
    known = set(re.findall(r"IMSERVER_[A-Z_]+", (ROOT / "imserver" / "cli.py").read_text()))
    for name in ("imserver.service", "Dockerfile", "compose.yaml"):
        used = set(re.findall(r"IMSERVER_[A-Z_]+", (DEPLOY / name).read_text(encoding="utf-8")))
        assert used and used <= known, (name, used - known)


def test_compose_workers_config_names_shipped_plugins() -> None:
    config = yaml.safe_load((DEPLOY / "workers.yaml").read_text(encoding="utf-8"))
    plugins = set(PYPROJECT["project"]["entry-points"]["imserver.workers"])
    assert config and set(config) <= plugins
