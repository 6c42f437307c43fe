"""``banaserve certs DIR``: a local cluster CA and one certificate per service role.

Writes, in DIR (created if missing; existing files are kept unless ``overwrite``):
  ca.crt, ca.key                      the cluster CA (keep ca.key off the serving machines)
  <role>.crt, <role>.key              one per role of services.rpc.security.Role: URI SAN
                                      ``spiffe://banaserve/<role>`` (what the servers check),
                                      DNS SANs banaserve.internal, localhost and ``hosts``,
                                      IP SANs 127.0.0.1 and ::1
  dataplane.secret                    32 random bytes the data planes authenticate peers with
  redis.secret                        the cluster Redis's password (64 hex digits)
Keys are ECDSA P-256, written 0600. Certificates are valid for ``days`` (at most
``MAX_DAYS``). Every input is checked before a key is made: a DIR that is a file or cannot be
created, a ``hosts`` entry that is no DNS name (a Unicode name is written as its IDNA A-label).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.errors import ConfigError
from services.common.paths import output_dir
from services.rpc.security import (
    CLUSTER_NAME,
    DATAPLANE_SECRET_FILE,
    REDIS_SECRET_FILE,
    ROLES,
    SPIFFE_PREFIX,
    Role,
)

# A century: past any sensible certificate's life, and far from year 9999, where X.509 dates
# (and Python's datetime) end.
MAX_DAYS = 36500
# One DNS label (letters, digits, inner hyphens), a "*." wildcard first at most; 253 in all.
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")


def dns_name(host: str) -> str:
    """``host`` as a certificate's DNS SAN: ASCII as given, Unicode as its IDNA A-label;
    ConfigError for anything else (spaces, "!", an empty label, over 253 characters)."""
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise ConfigError(f"host {host!r} is not a DNS name") from None
    if len(ascii_host) > 253 or not _DNS_NAME.fullmatch(ascii_host):
        raise ConfigError(f"host {host!r} is not a DNS name")
    return ascii_host


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "banaserve"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("banaserve cluster CA")
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_role_cert(
    role: Role,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    days: int,
    hosts: Sequence[str] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Usable as server and as client certificate: every service is both."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(SPIFFE_PREFIX + role.value)]
    names += [x509.DNSName(h) for h in (CLUSTER_NAME, "localhost", *hosts)]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1")]
    cert = (
        _builder(_name(f"banaserve-{role.value}"), ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def create_certs(
    directory: Path,
    roles: Sequence[Role] = ROLES,
    days: int = 365,
    hosts: Sequence[str] = (),
    overwrite: bool = False,
) -> list[Path]:
    """Writes the files of the module docstring; returns the paths written."""
    if not 1 <= days <= MAX_DAYS:
        raise ConfigError(f"days must be in 1..{MAX_DAYS}, got {days}")
    hosts = [dns_name(h) for h in hosts]
    created = not Path(directory).exists()
    directory = output_dir(Path(directory), "certs dir")
    if created:  # its owner's only, whatever the umask (000 made it 0777: probe, session 43)
        directory.chmod(0o700)
    existing = [p for p in directory.iterdir() if p.suffix in (".crt", ".key", ".secret")]
    if existing and not overwrite:
        raise ConfigError(f"{directory} already holds {existing[0].name}; pass --overwrite")
    ca_key, ca_cert = make_ca(days)
    pem = serialization.Encoding.PEM
    files = {
        "ca.crt": (ca_cert.public_bytes(pem), False),
        "ca.key": (_key_pem(ca_key), True),
        DATAPLANE_SECRET_FILE: (secrets.token_bytes(32), True),
        REDIS_SECRET_FILE: (secrets.token_hex(32).encode(), True),
    }
    for role in roles:
        key, cert = make_role_cert(role, ca_key, ca_cert, days, hosts)
        files[f"{role.value}.crt"] = (cert.public_bytes(pem), False)
        files[f"{role.value}.key"] = (_key_pem(key), True)
    for name, (data, private) in files.items():
        _write(directory / name, data, private)
    return [directory / name for name in files]
