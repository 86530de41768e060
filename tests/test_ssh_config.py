"""Effective ssh settings (sshrpc._ssh_config): ``ssh -G`` and the fallback
parser agree; explicit arguments win."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from sshrpc import SSHConfigError
from sshrpc._ssh_config import (
    DEFAULT_IDENTITIES,
    SSHSettings,
    parse_config_text,
    parse_ssh_g,
    resolve,
    settings_from_values,
)

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


# -- ssh -G output -> settings (pure: no ssh, no network) -----------------------

#: What OpenSSH 9.2's ``ssh -G`` prints for a host with no config (abridged:
#: the keys sshrpc reads or checks).
G_DEFAULTS = """\
host t
user root
hostname 10.1.1.1
port 22
addressfamily any
canonicalizehostname false
controlmaster false
hashknownhosts no
nohostauthenticationforlocalhost no
permitlocalcommand no
proxyusefdpass no
stricthostkeychecking ask
tunnel false
verifyhostkeydns false
serveralivecountmax 3
serveraliveinterval 0
hostkeyalgorithms ssh-ed25519-cert-v01@openssh.com,ssh-ed25519,ecdsa-sha2-nistp256,rsa-sha2-512
securitykeyprovider internal
identityfile ~/.ssh/id_rsa
globalknownhostsfile /etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2
userknownhostsfile /root/.ssh/known_hosts /root/.ssh/known_hosts2
connecttimeout none
"""


def _settings(extra: str = "", **kwargs: object) -> SSHSettings:
    values = parse_ssh_g(G_DEFAULTS + extra)
    # ssh -G prints each key once: a later line replaces the default.
    for line in extra.splitlines():
        key, _, value = line.partition(" ")
        if key not in ("identityfile", "certificatefile"):
            values[key] = [value]
    return settings_from_values(
        "t",
        values,
        source="ssh -G",
        defaults=parse_ssh_g(G_DEFAULTS),
        **kwargs,  # type: ignore[arg-type]
    )


def test_defaults_map_to_plain_settings() -> None:
    s = _settings()
    assert (s.hostname, s.port, s.user) == ("10.1.1.1", 22, "root")
    assert s.proxy is None and s.host_key_alias is None
    assert s.host_key_algorithms is None  # OpenSSH's default: reorder at connect
    assert s.global_known_hosts_files == ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
    assert s.connect_timeout is None and s.server_alive_interval == 0
    assert not s.accept_new_host_keys and s.agent and s.address_family == "any"


@pytest.mark.parametrize(
    ("line", "name"),
    [
        ("canonicalizehostname true", "CanonicalizeHostname true"),
        ("canonicalizehostname always", "CanonicalizeHostname always"),
        ("verifyhostkeydns true", "VerifyHostKeyDNS true"),
        ("verifyhostkeydns ask", "VerifyHostKeyDNS ask"),
        ("stricthostkeychecking false", "StrictHostKeyChecking false"),
        ("userknownhostsfile none", "UserKnownHostsFile none"),
        ("knownhostscommand /bin/echo %H", "KnownHostsCommand /bin/echo %H"),
        ("pkcs11provider /usr/lib/opensc-pkcs11.so", "PKCS11Provider"),
        ("securitykeyprovider /usr/lib/sk.so", "SecurityKeyProvider"),
        ("tunnel point-to-point", "Tunnel"),
        ("remotecommand uptime", "RemoteCommand uptime"),
        ("proxyusefdpass yes", "ProxyUseFdpass"),
        ("bindaddress 10.0.0.1", "BindAddress"),
        ("bindinterface eth1", "BindInterface"),
        ("revokedhostkeys /etc/ssh/revoked", "RevokedHostKeys"),
        ("nohostauthenticationforlocalhost yes", "NoHostAuthenticationForLocalhost"),
        ("identityagent /run/other-agent.sock", "IdentityAgent"),
        ("permitlocalcommand yes\nlocalcommand echo hi", "LocalCommand echo hi"),
    ],
)
def test_options_we_do_not_implement_are_refused_by_name(line: str, name: str) -> None:
    with pytest.raises(SSHConfigError, match=re.escape(name)):
        _settings(line + "\n")


def test_accepted_values_of_checked_options() -> None:
    assert _settings("stricthostkeychecking accept-new\n").accept_new_host_keys
    assert not _settings("stricthostkeychecking true\n").accept_new_host_keys
    assert not _settings("identityagent none\n").agent
    assert _settings("localcommand echo hi\n").proxy is None  # PermitLocalCommand no
    assert _settings("controlmaster auto\ncontrolpath /tmp/cm\n").proxy is None


def test_proxy_jump_becomes_openssh_ssh_w() -> None:
    s = _settings("proxyjump me@a:2200,ops@[::1]:2222\n", config_file="/cfg")
    assert s.proxy is not None and s.proxy.option == "ProxyJump"
    argv = s.proxy.argv
    assert argv[1:] == (
        "-l", "ops", "-p", "2222", "-J", "me@a:2200", "-F", "/cfg",
        "-W", "[10.1.1.1]:22", "::1",
    )  # fmt: skip
    one = _settings("proxyjump ssh://bastion\n").proxy
    assert one is not None and one.argv[1:] == ("-W", "[10.1.1.1]:22", "bastion")
    with pytest.raises(SSHConfigError, match="ProxyJump"):
        _settings("proxyjump bastion:ssh\n")


def test_proxy_command_tokens() -> None:
    s = _settings("proxycommand nc %h %p %r %n 100%%\n", port=2022)
    assert s.proxy is not None
    assert s.proxy.argv[1:] == ("-c", "exec nc 10.1.1.1 2022 root t 100%")
    with pytest.raises(SSHConfigError, match="unknown token %z"):
        _settings("proxycommand nc %z\n")


def test_host_keys_timeouts_and_certificates() -> None:
    s = _settings(
        "hostkeyalias myalias\nhostkeyalgorithms rsa-sha2-256,ssh-ed25519\n"
        "connecttimeout 7\nserveraliveinterval 5\nserveralivecountmax 2\n"
        "certificatefile ~/.ssh/id-cert.pub\nhashknownhosts yes\naddressfamily inet\n"
    )
    assert s.host_key_alias == "myalias"
    assert s.host_key_algorithms == ("rsa-sha2-256", "ssh-ed25519")
    assert (s.connect_timeout, s.server_alive_interval, s.server_alive_count_max) == (7, 5, 2)
    assert s.certificate_files == (os.path.expanduser("~/.ssh/id-cert.pub"),)
    assert s.hash_known_hosts and s.address_family == "inet"


def test_fallback_parser_reads_the_new_options(tmp_path: Path) -> None:
    values = parse_config_text(
        "Host x\n  ProxyJump bastion\n  HostKeyAlgorithms +ssh-rsa\n"
        "  CertificateFile a\n  CertificateFile b\n",
        "x",
    )
    s = settings_from_values("x", values, source="parser")
    assert s.proxy is not None and s.proxy.argv[-1] == "bastion"
    assert s.host_key_algorithms is not None and s.host_key_algorithms[-1] == "ssh-rsa"
    assert len(s.certificate_files) == 2


def test_algorithm_lists_set_by_the_config() -> None:
    s = _settings(
        "ciphers aes256-ctr,aes128-ctr\nmacs hmac-sha2-512\nkexalgorithms curve25519-sha256\n"
    )
    assert s.ciphers == ("aes256-ctr", "aes128-ctr")
    assert s.macs == ("hmac-sha2-512",)
    assert s.kex_algorithms == ("curve25519-sha256",)
    assert _settings().ciphers is None  # not set: sshrpc's defaults
    values = parse_config_text("Host x\n  Ciphers -aes128-ctr\n", "x")
    parsed = settings_from_values("x", values, source="parser").ciphers
    assert parsed is not None and "aes128-ctr" not in parsed and "aes256-ctr" in parsed


def test_fallback_parser_keeps_a_proxy_command_as_written() -> None:
    values = parse_config_text("Host x\n  ProxyCommand sh -c 'echo a  b; exit 3'\n", "x")
    proxy = settings_from_values("x", values, source="parser").proxy
    assert proxy is not None
    assert proxy.argv[1:] == ("-c", "exec sh -c 'echo a  b; exit 3'")
