"""The security flags, `banaserve certs`, and the rule table's defaults."""

from __future__ import annotations

import argparse

import pytest
from cryptography import x509

from services.cli import main as cli
from services.common.errors import ConfigError
from services.rpc.security import (
    INTERNAL,
    ROLES,
    Role,
    SecurityConfig,
    add_security_args,
    caller_of_token,
    read_tokens,
    redis_password,
    rule_for,
    security_argv,
    security_config,
    token_from_header,
    token_valid,
)


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_security_args(p)
    return p.parse_args(list(argv))


def test_both_off_by_default_and_flags_round_trip(certs, tmp_path):
    assert security_config(_args(), Role.ROUTER) is None
    tokens = tmp_path / "tokens"
    tokens.write_text("# a comment\n\n  token-aaaaaaaaaaaaaaaa  \ntoken-bbbbbbbbbbbbbbbb\n")
    argv = security_argv(str(certs), str(tokens))
    config = security_config(_args(*argv), Role.DECODE)
    assert config.api_tokens == ("token-aaaaaaaaaaaaaaaa", "token-bbbbbbbbbbbbbbbb")
    assert (config.tls.cert.name, config.tls.key.name, config.tls.ca.name) == (
        "decode.crt",
        "decode.key",
        "ca.crt",
    )
    assert len(config.dataplane_secret) == 32
    assert config.redis_password == (certs / "redis.secret").read_text()  # 64 hex digits


def test_token_files_name_the_line_of_a_bad_token_and_take_ascii_only(tmp_path):
    """Probe, session 43: a non-ASCII token passed the check and failed every call INTERNAL
    "Invalid metadata" once the cluster was up; a comment after a token was refused without
    naming the file or the line."""
    tokens = tmp_path / "tokens"
    for text, line, problem in (
        ("# a comment\n" + "é" * 17 + "\n", 2, "must be printable ASCII without spaces, got the character 'é'"),
        ("token-aaaaaaaaaaaaaaaa # Alice's\n", 1, "must be printable ASCII without spaces, got the character ' '"),
        ("\n\nshort\n", 3, "must be at least 16 characters, got 5"),
    ):  # fmt: skip
        tokens.write_text(text)
        with pytest.raises(ConfigError) as info:
            read_tokens(tokens)
        assert str(info.value) == f"{tokens}, line {line}: an API token {problem}"


def test_the_redis_password_comes_from_the_certificates_directory(certs, tmp_path, caplog):
    assert redis_password("") == ""
    assert redis_password(str(tmp_path)) == ""  # an older directory: none, and a warning
    assert "redis.secret is missing: Redis without a password" in caplog.text
    (tmp_path / "redis.secret").write_text("short\n")
    with pytest.raises(ConfigError, match="must be >= 16 printable ASCII characters"):
        redis_password(str(tmp_path))
    assert len(redis_password(str(certs))) == 64


def test_bad_settings_fail_at_start(certs, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        security_config(_args("--tls-dir", str(tmp_path)), Role.ROUTER)
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="holds no token"):
        security_config(_args("--api-token-file", str(empty)), Role.ROUTER)
    with pytest.raises(ConfigError, match="must be at least 16 characters, got 5"):
        SecurityConfig(Role.ROUTER, api_tokens=("short",))
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xf4\x90" * 20)  # was a UnicodeDecodeError traceback at start
    with pytest.raises(ConfigError, match="cannot read the API token file .*utf-8"):
        security_config(_args("--api-token-file", str(binary)), Role.ROUTER)
    (tmp_path / "ca.crt").write_bytes((certs / "ca.crt").read_bytes())
    for suffix in ("crt", "key"):
        (tmp_path / f"router.{suffix}").write_bytes((certs / f"router.{suffix}").read_bytes())
    with pytest.raises(ConfigError, match="data-plane secret"):
        security_config(_args("--tls-dir", str(tmp_path)), Role.ROUTER)


def test_tokens_compare_in_full_and_identify_their_holder():
    accepted = ("token-aaaaaaaaaaaaaaaa", "token-bbbbbbbbbbbbbbbb")
    assert token_from_header("Bearer token-aaaaaaaaaaaaaaaa") == "token-aaaaaaaaaaaaaaaa"
    assert token_from_header("token-aaaaaaaaaaaaaaaa") == ""
    assert token_valid("token-bbbbbbbbbbbbbbbb", accepted)
    assert not token_valid("token-bbbbbbbbbbbbbbb", accepted)  # a prefix is not the token
    assert not token_valid("", accepted)
    assert caller_of_token("") == ""
    assert caller_of_token(accepted[0]) != caller_of_token(accepted[1])
    assert accepted[0] not in caller_of_token(accepted[0])


def test_unlisted_services_are_internal_only():
    assert rule_for("/banaserve.v1.SomethingNew/Do").roles == INTERNAL
    assert rule_for("/banaserve.v1.DecodeService/ReserveKV").roles == {Role.ROUTER}
    assert rule_for("/banaserve.v1.RouterService/Generate").token
    assert rule_for("/grpc.health.v1.Health/Check").roles == set(ROLES)


def test_certs_command_writes_a_ca_and_one_certificate_per_role(tmp_path, capsys):
    out = tmp_path / "tls"
    assert cli(["certs", str(out), "--days", "2", "--host", "router.svc"]) == 0
    names = sorted(p.name for p in out.iterdir())
    roles = sorted(f"{r.value}.{s}" for r in ROLES for s in ("crt", "key"))
    assert names == sorted(["ca.crt", "ca.key", "dataplane.secret", "redis.secret", *roles])
    assert (out / "redis.secret").stat().st_mode & 0o777 == 0o600
    assert out.stat().st_mode & 0o777 == 0o700  # created here: its owner's only
    assert (out / "decode.key").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate((out / "decode.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://banaserve/decode"]
    assert san.get_values_for_type(x509.DNSName) == [
        "banaserve.internal",
        "localhost",
        "router.svc",
    ]
    assert cli(["certs", str(out)]) == 2  # refuses to overwrite
    assert "pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content", [b"", b"# none\n", b"\xf4\x90" * 20], ids=["empty", "comment", "binary"]
)
def test_health_with_an_unusable_token_file_is_a_flag_error_before_any_call(
    tmp_path, content, capsys
):
    """``banaserve health --registered-at R --api-token-file F`` read F only after the server
    answered, with its own ``split()[0]``: an empty file was an IndexError traceback, a binary
    one a UnicodeDecodeError. Now the flag is read first, as the services read it: exit 2."""
    from services.rpc.probe import main as probe

    token_file = tmp_path / "tokens"
    token_file.write_bytes(content)
    argv = ["127.0.0.1:1", "--registered-at", "127.0.0.1:2", "--api-token-file", str(token_file)]
    assert probe(argv) == 2
    assert capsys.readouterr().err.startswith("health: ")
    assert cli(["health", *argv]) == 2


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda d, c: (d / "router.key").write_text("junk\n"),
            "router.key is not a PEM private key",
        ),
        (
            lambda d, c: (d / "router.crt").write_text("junk\n"),
            "router.crt is not a PEM certificate",
        ),
        (lambda d, c: (d / "ca.crt").write_bytes(b"\x00\x01"), "ca.crt is not a PEM certificate"),
        (
            lambda d, c: (d / "router.key").write_bytes((c / "decode.key").read_bytes()),
            "router.key is not the key of certificate",
        ),
    ],
    ids=["junk key", "junk cert", "binary ca", "another role's key"],
)
def test_damaged_or_mismatched_tls_files_are_named_at_start(certs, tmp_path, damage, message):
    """grpc took any bytes and then failed to bind the server ("Failed to bind to address
    127.0.0.1:0", a RuntimeError traceback) or every handshake (session 38's probe)."""
    for name in ("ca.crt", "router.crt", "router.key", "dataplane.secret"):
        (tmp_path / name).write_bytes((certs / name).read_bytes())
    security_config(_args("--tls-dir", str(tmp_path)), Role.ROUTER)  # intact: accepted
    damage(tmp_path, certs)
    with pytest.raises(ConfigError, match=message):
        security_config(_args("--tls-dir", str(tmp_path)), Role.ROUTER)
