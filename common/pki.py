"""Certificates and keys for a deployment: `fedtune certs DIR --nodes N --host HOST`.

    DIR/ca.crt, DIR/ca.key                  the federation's root CA (keep ca.key offline)
    DIR/server.crt, DIR/server.key          the SuperLink's TLS certificate (SAN: the hosts)
    DIR/nodes/<name>, DIR/nodes/<name>.pub  one EC key pair per SuperNode (OpenSSH format),
                                            registered with `flwr supernode register`

Flower does TLS and node authentication itself; this only removes the manual openssl and
ssh-keygen steps. Node keys use NIST P-384, which Flower requires.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.errors import ConfigError

VALID_DAYS = 365


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune")])


def _write(path: Path, data: bytes, *, private: bool) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_ca(out: Path, *, name: str = "fedtune root CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA384()))
    _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / "ca.key", _pem_key(key), private=True)
    return cert, key


def make_server_cert(out: Path, ca_cert, ca_key, *, hosts: list[str]) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA384()))
    _write(out / "server.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / "server.key", _pem_key(key), private=True)


def make_node_keys(out: Path, name: str) -> Path:
    """An EC P-384 key pair in OpenSSH format, as flower-supernode and `flwr supernode register` expect."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(out / name, private, private=True)
    _write(out / f"{name}.pub", public + f" {name}\n".encode(), private=False)
    return out / f"{name}.pub"


def make_deployment_pki(out: Path, *, nodes: list[str], hosts: list[str]) -> None:
    if (out / "ca.key").exists():
        raise ConfigError(f"certs: expected a new directory, but {out / 'ca.key'} exists; refusing to overwrite it")
    if not nodes or len(set(nodes)) != len(nodes):
        raise ConfigError(f"certs: expected distinct node names, got {nodes}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "nodes").mkdir(exist_ok=True)
    ca_cert, ca_key = make_ca(out)
    make_server_cert(out, ca_cert, ca_key, hosts=hosts)
    for name in nodes:
        make_node_keys(out / "nodes", name)
