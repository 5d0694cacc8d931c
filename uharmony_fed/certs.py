"""Development PKI: a CA, a server certificate, and SuperNode keys for each site.

For trials and tests only. A real deployment uses the hospital group's own PKI: the
server certificate from its CA (with the public host name in subjectAltName), and site
keys generated at each site, whose public halves alone reach the coordinator.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from uharmony_fed.checkpoint import atomic_write_bytes


def _write_secret(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    os.chmod(path, 0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "uharmony-fed development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certs(out: Path, hosts: Sequence[str] = ("localhost", "127.0.0.1"),
               sites: Sequence[str] = (), days: int = 365, force: bool = False) -> dict[str, Path]:
    """Write ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` and ``sites/<site>.key(.pub)``.

    An existing CA and server certificate are kept (sites already hold that ``ca.crt``),
    and so is an existing site key; only what is missing is made, unless ``force``.

    Args:
        out: the folder to write into (created).
        hosts: DNS names and IP addresses the server certificate is valid for.
        sites: site names to make SuperNode authentication keys for (EC P-384,
            OpenSSH format, as Flower's SuperNode authentication expects).
        days: validity of the certificates.
        force: make a new CA and server certificate even if they exist.

    Returns:
        The paths of the files, by role.
    """
    out = Path(out)
    paths = {"ca_cert": out / "ca.crt", "ca_key": out / "ca.key",
             "server_cert": out / "server.pem", "server_key": out / "server.key"}
    if force or not all(p.is_file() for p in paths.values()):
        _make_ca_and_server(paths, hosts, days)
    for site in sites:
        priv, pub = Path(out) / "sites" / f"{site}.key", Path(out) / "sites" / f"{site}.key.pub"
        if force or not (priv.is_file() and pub.is_file()):
            priv, pub = make_site_key(out / "sites", site)
        paths[f"{site}_key"], paths[f"{site}_pub"] = priv, pub
    return paths


def _make_ca_and_server(paths: dict[str, Path], hosts: Sequence[str], days: int) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("uharmony-fed dev CA")).issuer_name(_name("uharmony-fed dev CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    alt: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0] if hosts else "localhost"))
        .issuer_name(ca_cert.subject).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    atomic_write_bytes(paths["ca_cert"], ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(paths["ca_key"], _pem_key(ca_key))
    atomic_write_bytes(paths["server_cert"], server_cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(paths["server_key"], _pem_key(server_key))


def make_site_key(folder: Path, site: str) -> tuple[Path, Path]:
    """An EC key pair in OpenSSH format for SuperNode authentication: (private, public)."""
    key = ec.generate_private_key(ec.SECP384R1())
    priv = Path(folder) / f"{site}.key"
    pub = Path(folder) / f"{site}.key.pub"
    _write_secret(priv, key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    atomic_write_bytes(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                          serialization.PublicFormat.OpenSSH)
                       + f" {site}\n".encode())
    return priv, pub


def enrolment_help(out: Path, sites: Sequence[str], server: str) -> str:
    """The commands a coordinator and each site run with these files."""
    lines = [f"Wrote a development CA and server certificate to {out}.",
             "Coordinator: uharmony-fed server --config fed.yaml   (enrols every sites/*.key.pub it finds)",
             "Or enrol one site by hand once the server runs:",
             f"  FLWR_HOME=<run-dir>/.flwr flwr supernode register {out}/sites/<site>.key.pub server"]
    for site in sites:
        lines.append(f"Site {site}: copy {out}/ca.crt and {out}/sites/{site}.key to the site, then")
        lines.append(f"  uharmony-fed client --site {site} --server {server} "
                     f"--ca ca.crt --key {site}.key")
    return "\n".join(lines)
