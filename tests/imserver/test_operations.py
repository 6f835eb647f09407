"""Operations: ``--version``, the LICENSE, and the deployment files in ``deploy/``
agreeing with the code they run (flags, environment variables, the drain bound).

The container image and the systemd unit are not started here (no Docker or
systemd in the test environment); what can drift silently is checked instead.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from imserver.cli import build_parser, env_var_of
from imserver.limits import (
    CLOSE_LINGER_S,
    CLOSE_SEND_TIMEOUT_S,
    DRAIN_TIMEOUT_S,
    MAX_CONNECTIONS,
)
from imserver.metrics import METRICS
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


def _options(
    parser: argparse.ArgumentParser, command: str = ""
) -> Iterator[tuple[str, argparse.Action]]:
    """Every option of every subcommand (not --help, --version or positionals)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from _options(subparser, f"{command} {name}".strip())
        elif action.option_strings and action.default != argparse.SUPPRESS:
            yield command, action


def test_every_flag_has_an_environment_variable_shown_in_help() -> None:
    options = list(_options(build_parser()))
    assert len(options) > 25  # the walk reaches every subcommand
    missing = [(cmd, a.option_strings) for cmd, a in options if env_var_of(a) is None]
    assert not missing, missing
    per_command: dict[str, list[str]] = {}
    for command, action in options:
        per_command.setdefault(command, []).append(str(env_var_of(action)))
    for command, names in per_command.items():  # one variable never sets two flags
        assert len(names) == len(set(names)), command
        help_text = _help(command)
        assert all(name in help_text for name in names), command


def _help(command: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "imserver", *command.split(), "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    return out.stdout


def test_environment_variables_set_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMSERVER_SHARDS", "4")
    monkeypatch.setenv("IMSERVER_TOKEN_ONCE", "yes")
    monkeypatch.setenv("IMSERVER_TOKEN_TTL", "60")
    monkeypatch.setenv("IMSERVER_CHAT_SHOP", "shop9")
    monkeypatch.setenv("IMSERVER_EXPORT_SHOP", "shop9")
    parser = build_parser()
    assert parser.parse_args(["serve"]).shards == 4
    token = parser.parse_args(["token", "u1"])
    assert token.once is True and token.ttl == 60
    assert parser.parse_args(["token", "u1", "--ttl", "5"]).ttl == 5  # the flag wins
    assert parser.parse_args(["chat", "u1"]).shop == "shop9"  # --shop was required
    assert parser.parse_args(["export"]).shop == "shop9"  # one of --conv/--shop was required
    monkeypatch.setenv("IMSERVER_TOKEN_ONCE", "0")
    assert build_parser().parse_args(["token", "u1"]).once is False


def test_plugin_dependencies_are_in_the_default_install() -> None:
    """`pip install .` then `serve --workers bot,routing,crm`: every third-party module
    the server and the shipped plugins import is a default dependency, not an extra."""
    default = {
        re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")
        for req in PYPROJECT["project"]["dependencies"]
    }
    distributions = importlib.metadata.packages_distributions()
    imported: set[str] = set()
    for path in [*(ROOT / "workers").rglob("*.py"), *(ROOT / "imserver").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {
        dist.lower().replace("_", "-")
        for module in imported - set(sys.stdlib_module_names) - {"protocol", "imserver", "workers"}
        for dist in distributions.get(module, [module])
    }
    assert {"pyyaml", "jieba", "rapidfuzz", "simplemma", "uvloop"} <= third_party
    assert third_party <= default, third_party - default


def test_process_metrics_are_exported() -> None:
    text = METRICS.render().decode()
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert re.search(rf"^{name} \d", text, re.MULTILINE), name


def test_environment_variables_are_ones_the_cli_reads() -> None:
    known = {str(env_var_of(action)) for _, action in _options(build_parser())}
    for name in ("imserver.service", "Dockerfile", "compose.yaml"):
        used = set(re.findall(r"IMSERVER_[A-Z_]+", (DEPLOY / name).read_text(encoding="utf-8")))
        assert used and used <= known, (name, used - known)


def test_compose_workers_config_names_shipped_plugins() -> None:
    config = yaml.safe_load((DEPLOY / "workers.yaml").read_text(encoding="utf-8"))
    plugins = set(PYPROJECT["project"]["entry-points"]["imserver.workers"])
    assert config and set(config) <= plugins
