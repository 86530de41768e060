"""Effective ssh settings (sshrpc._ssh_config): ``ssh -G`` and the fallback
parser agree; explicit arguments win."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sshrpc._ssh_config import DEFAULT_IDENTITIES, parse_config_text, resolve

CONFIG = """\
# test config
Host alias
    HostName 127.0.0.1
    User alice
    Port 2222
    IdentityFile {keys}/id_alias
    UserKnownHostsFile {keys}/kh_alias

Host *.example.org !bad.example.org
    User bob
    Include {keys}/included

Match host nothing
    User mallory

Host *
    User fallback
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "included").write_text("Port 2200\n")
    path = tmp_path / "config"
    path.write_text(CONFIG.format(keys=tmp_path))
    return path


@pytest.mark.parametrize("use_ssh", [True, False])
def test_alias(config: Path, use_ssh: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if use_ssh and shutil.which("ssh") is None:
        pytest.skip("no OpenSSH client on this machine")
    if not use_ssh:
        monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    s = resolve("alias", config_file=config)
    assert s.source == ("ssh -G" if use_ssh else "parser")
    assert (s.hostname, s.user, s.port) == ("127.0.0.1", "alice", 2222)
    assert s.identity_files == (f"{config.parent}/id_alias",)
    assert not s.default_identities
    assert s.known_hosts_files == (f"{config.parent}/kh_alias",)


@pytest.mark.parametrize("use_ssh", [True, False])
def test_patterns_include_and_negation(
    config: Path, use_ssh: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if use_ssh and shutil.which("ssh") is None:
        pytest.skip("no OpenSSH client on this machine")
    if not use_ssh:
        monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    s = resolve("a.example.org", config_file=config)
    assert (s.hostname, s.user, s.port) == ("a.example.org", "bob", 2200)
    assert s.default_identities
    assert s.identity_files == tuple(os.path.expanduser(p) for p in DEFAULT_IDENTITIES)
    bad = resolve("bad.example.org", config_file=config)
    assert (bad.user, bad.port) == ("fallback", 22)


def test_explicit_arguments_win(config: Path, tmp_path: Path) -> None:
    s = resolve(
        "alias",
        port=2022,
        user="carol",
        identity=str(tmp_path / "mine"),
        known_hosts=str(tmp_path / "kh"),
        config_file=config,
    )
    assert (s.hostname, s.user, s.port) == ("127.0.0.1", "carol", 2022)
    assert s.identity_files == (str(tmp_path / "mine"),)
    assert s.known_hosts_files == (str(tmp_path / "kh"),)


def test_no_config() -> None:
    s = resolve("somewhere", use_config=False)
    assert (s.hostname, s.port) == ("somewhere", 22)
    assert s.source == "none"


def test_parser_first_value_wins_and_match_is_skipped() -> None:
    values = parse_config_text(
        "Host x\n  Port 1\nHost *\n  Port 2\n  IdentityFile a\nMatch all\n  User m\n", "x"
    )
    assert values["port"] == ["1"]
    assert values["identityfile"] == ["a"]
    assert "user" not in values
