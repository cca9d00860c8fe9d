"""A small X.509 PKI for the fleet: one CA, server, device and service certificates (``cryptography``).

Device certificates carry the device id as their common name; mosquitto's
``use_identity_as_username`` turns it into the MQTT username that the topic ACL keys on. Private keys
are written with mode 0600. Keys are ECDSA P-256: small and fast on ARM boards.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.protocol import SERVICE_IDENTITIES, check_device_id

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
GUARDED_SERVICES = SERVICE_IDENTITIES | {"homeassistant"}
"""Service identities whose client ids the broker guard accepts as ``NAME-...`` (deploy/mosquitto)."""


def check_device_name(name: str) -> str:
    """``name`` if a device certificate may carry it; ValueError naming the clash otherwise.

    Besides the reserved ids, a device name may not start with a service name and ``-``: the broker guard
    lets a service use client ids ``NAME-...`` (deploy/mosquitto/edgefleet_guard.c), and a device's client
    id is its name, so a device ``monitor-7`` could be disconnected by the monitor's certificate.
    """
    check_device_id(name)
    for service in sorted(GUARDED_SERVICES):
        if name.lower().startswith(f"{service}-"):
            raise ValueError(
                f"{name!r} starts with {service + '-'!r}: the client ids of the service identity {service!r} "
                "look like that (the broker guard accepts them); choose another device id"
            )
    return name


@dataclass(frozen=True)
class CertFiles:
    """Paths of one issued identity."""

    cert: Path
    key: Path
    ca: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def init_ca(
    directory: str | Path, name: str = "EdgeFleet CA", days: int = 3650, overwrite: bool = False
) -> CertFiles:
    """Create a self-signed CA in ``directory`` (refuses to replace an existing one)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if (d / CA_KEY).exists() and not overwrite:
        raise FileExistsError(f"{d / CA_KEY}: a CA already exists here")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(d / CA_KEY, key)
    _write_cert(d / CA_CERT, cert)
    return CertFiles(cert=d / CA_CERT, key=d / CA_KEY, ca=d / CA_CERT)


def _alt_names(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    """Subject alternative names of a server: IP addresses as IPs, anything else as a DNS name."""
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def issue(
    directory: str | Path,
    common_name: str,
    kind: str = "device",
    hosts: tuple[str, ...] = (),
    days: int = 825,
    out_dir: str | Path | None = None,
    force: bool = False,
) -> CertFiles:
    """Issue a certificate signed by the CA in ``directory``.

    ``kind`` is ``server`` (a broker or HTTP server: serverAuth, ``hosts`` as subject alt names),
    ``device`` or ``service`` (clientAuth; the common name becomes the MQTT username). A device may not
    take a reserved name (a service's identity would get the service's ACL), and an existing key is
    replaced only with ``force`` (FileExistsError otherwise).
    """
    if kind not in ("server", "device", "service"):
        raise ValueError(f"kind must be server, device or service, got {kind!r}")
    if kind == "device":
        check_device_name(common_name)
    d = Path(directory)
    out = Path(out_dir) if out_dir else d / kind
    if (out / f"{common_name}.key").exists() and not force:
        raise FileExistsError(f"{out / common_name}.key exists: re-issuing replaces the key (use --force)")
    ca_key = serialization.load_pem_private_key((d / CA_KEY).read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((d / CA_CERT).read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if kind == "server":
        builder = builder.add_extension(_alt_names(hosts or ("localhost", "127.0.0.1")), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    _write_key(out / f"{common_name}.key", key)
    _write_cert(out / f"{common_name}.crt", cert)
    return CertFiles(cert=out / f"{common_name}.crt", key=out / f"{common_name}.key", ca=d / CA_CERT)
