"""known_hosts lookup (sshrpc._known_hosts): plain, hashed, [host]:port,
patterns, @revoked; errors name the fingerprint and the file to edit."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from pathlib import Path

import pytest

from sshrpc import HostKeyMismatch, UnknownHostKey
from sshrpc._known_hosts import (
    HostKeyStatus,
    add,
    check,
    fingerprint,
    host_key_algorithms,
    key_type,
    known_key_types,
    status,
)
from sshrpc._ssh_config import DEFAULT_HOST_KEY_ALGORITHMS


def _blob(seed: bytes) -> bytes:
    kind = b"ssh-ed25519"
    key = hashlib.sha256(seed).digest()
    return struct.pack(">I", len(kind)) + kind + struct.pack(">I", len(key)) + key


KEY = _blob(b"server")
OTHER = _blob(b"attacker")
B64 = base64.b64encode(KEY).decode()
OTHER_B64 = base64.b64encode(OTHER).decode()


def _hashed(name: str) -> str:
    salt = os.urandom(20)
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def _file(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "known_hosts"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize(
    "line",
    [
        f"[127.0.0.1]:2222 ssh-ed25519 {B64}",
        f"other,[127.0.0.1]:2222 ssh-ed25519 {B64} comment",
        f"[127.0.0.*]:2222 ssh-ed25519 {B64}",
        f"{_hashed('[127.0.0.1]:2222')} ssh-ed25519 {B64}",
    ],
)
def test_trusted(tmp_path: Path, line: str) -> None:
    check([_file(tmp_path, "# comment", "", line)], "127.0.0.1", 2222, KEY)


def test_port_22_uses_the_bare_name(tmp_path: Path) -> None:
    check([_file(tmp_path, f"example.org ssh-ed25519 {B64}")], "example.org", 22, KEY)
    with pytest.raises(UnknownHostKey):
        check([_file(tmp_path, f"example.org ssh-ed25519 {B64}")], "example.org", 2222, KEY)


def test_unknown_names_fingerprint_and_file(tmp_path: Path) -> None:
    path = _file(tmp_path, f"elsewhere ssh-ed25519 {B64}", f"!x,[127.0.0.1]:1 ssh-rsa {B64}")
    with pytest.raises(UnknownHostKey) as info:
        check([path], "127.0.0.1", 2222, KEY)
    assert info.value.fingerprint == fingerprint(KEY)
    assert fingerprint(KEY) in str(info.value)
    assert path in str(info.value)
    assert "accept_new_host_keys" in str(info.value)


def test_negated_pattern_does_not_match(tmp_path: Path) -> None:
    path = _file(tmp_path, f"*,!127.0.0.1 ssh-ed25519 {B64}")
    with pytest.raises(UnknownHostKey):
        check([path], "127.0.0.1", 22, KEY)


def test_changed_key_is_a_mismatch_naming_the_line(tmp_path: Path) -> None:
    path = _file(tmp_path, "# first", f"{_hashed('[h]:2222')} ssh-ed25519 {OTHER_B64}")
    with pytest.raises(HostKeyMismatch) as info:
        check([path], "h", 2222, KEY)
    text = str(info.value)
    assert "CHANGED" in text and fingerprint(KEY) in text
    assert f"line 2 of {path}" in text
    assert info.value.known_hosts == path


def test_revoked_key_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, f"@revoked * ssh-ed25519 {B64}", f"h ssh-ed25519 {B64}")
    with pytest.raises(HostKeyMismatch, match="revoked"):
        check([path], "h", 22, KEY)


def test_second_file_and_missing_files(tmp_path: Path) -> None:
    second = tmp_path / "second"
    second.write_text(f"h ssh-ed25519 {B64}\n")
    check([str(tmp_path / "missing"), str(second)], "h", 22, KEY)


def test_add_then_trusted(tmp_path: Path) -> None:
    path = str(tmp_path / "sub" / "known_hosts")
    add(path, "127.0.0.1", 2222, KEY)
    assert Path(path).read_text() == f"[127.0.0.1]:2222 ssh-ed25519 {B64}\n"
    assert Path(path).stat().st_mode & 0o777 == 0o600
    check([path], "127.0.0.1", 2222, KEY)
    assert key_type(KEY) == "ssh-ed25519"


def _typed_blob(kind: str, seed: bytes) -> bytes:
    raw = kind.encode()
    key = hashlib.sha256(seed).digest()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(key)) + key


def test_a_key_of_another_type_is_not_changed(tmp_path: Path) -> None:
    """Only ed25519 known; the server shows ecdsa: unknown (never CHANGED),
    and the message names the known type."""
    known = _file(tmp_path, f"[h]:2222 ssh-ed25519 {B64}")
    ecdsa = _typed_blob("ecdsa-sha2-nistp256", b"server")
    assert status([known], "h", 2222, ecdsa) is HostKeyStatus.OTHER_TYPE
    with pytest.raises(UnknownHostKey, match="only by ssh-ed25519") as info:
        check([known], "h", 2222, ecdsa)
    assert not isinstance(info.value, HostKeyMismatch)
    # Same type, other key: CHANGED, as before.
    assert status([known], "h", 2222, OTHER) is HostKeyStatus.CHANGED


def test_host_key_algorithms_put_known_types_first(tmp_path: Path) -> None:
    preferred = list(DEFAULT_HOST_KEY_ALGORITHMS)
    assert host_key_algorithms(preferred, []) == preferred
    assert host_key_algorithms(preferred, ["ssh-rsa"])[:2] == ["rsa-sha2-512", "rsa-sha2-256"]
    order = host_key_algorithms(preferred, ["ecdsa-sha2-nistp384", "ssh-ed25519"])
    assert order[:2] == ["ssh-ed25519", "ecdsa-sha2-nistp384"]
    assert sorted(order) == sorted(preferred)
    known = _file(
        tmp_path,
        f"[h]:2222 ssh-ed25519 {B64}",
        f"@revoked [h]:2222 ssh-ed25519 {OTHER_B64}",
        f"other ssh-rsa {OTHER_B64}",
    )
    assert known_key_types([known], "[h]:2222") == ["ssh-ed25519"]


def test_alias_and_hashed_entries(tmp_path: Path) -> None:
    path = str(tmp_path / "kh")
    add(path, "h", 2222, KEY, alias="myalias", hashed=True)
    line = Path(path).read_text()
    assert line.startswith("|1|") and "myalias" not in line
    check([path], "h", 2222, KEY, alias="myalias")
    with pytest.raises(UnknownHostKey):
        check([path], "h", 2222, KEY)
