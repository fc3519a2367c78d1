"""Certificates and keys for a deployment: `fedtune certs DIR --nodes N --host HOST`.

    DIR/ca.crt, DIR/ca.key                  the federation's root CA (keep ca.key offline)
    DIR/server.crt, DIR/server.key          the SuperLink's TLS certificate (SAN: the hosts)
    DIR/nodes/<name>, DIR/nodes/<name>.pub  one EC key pair per SuperNode (OpenSSH format),
                                            registered with `flwr supernode register`

`fedtune certs DIR --nodes N --keys-only` writes only the node key pairs (into DIR/nodes/), for a
data owner making its own pair or a coordinator adding a node: the CA and server files are never
read or written. Nothing is ever overwritten: every file is created exclusively, private keys with
mode 0600 from the start, and node names are plain file names. Everything is made in a temporary
folder beside DIR and moved into place only when all of it exists, so a refusal or a failure
leaves no half-made PKI that would block a re-run.

Flower does TLS and node authentication itself; this only removes the manual openssl and
ssh-keygen steps. Node keys use NIST P-384, which Flower requires.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shutil
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.errors import ConfigError

VALID_DAYS = 365
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, common_name), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune")]
    )


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Create `path` (never replace it), private keys readable by their owner alone from the start."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    except FileExistsError:
        raise ConfigError(f"certs: expected no file at {path}, found one; refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


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
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA384())
    )
    _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / "ca.key", _pem_key(key), private=True)
    return cert, key


def make_server_cert(out: Path, ca_cert, ca_key, *, hosts: list[str]) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    _write(out / "server.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / "server.key", _pem_key(key), private=True)


def make_node_keys(out: Path, name: str) -> Path:
    """An EC P-384 key pair in OpenSSH format, as flower-supernode and `flwr supernode register` expect."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(out / name, private, private=True)
    _write(out / f"{name}.pub", public + f" {name}\n".encode(), private=False)
    return out / f"{name}.pub"


def check_hosts(hosts: list[str]) -> None:
    """--host: IP addresses or DNS names (ASCII labels), which is what a TLS client matches; not a URL."""
    for host in hosts:
        try:
            ipaddress.ip_address(host)
            continue
        except ValueError:
            pass
        labels = host.split(".")
        if not host or len(host) > 253 or not host.isascii() or not all(DNS_LABEL.fullmatch(x) for x in labels):
            raise ConfigError(
                f"--host: expected an IP address or a DNS name such as coordinator.example.org "
                f"(ASCII letters, digits and '-', dot-separated; no scheme, port or path), got {host!r}"
            )


def check_node_names(nodes: list[str]) -> None:
    """Node names become file names under nodes/: letters, digits, '.', '_' and '-', no paths; no name
    may be another's public-key file (x and x.pub)."""
    bad = [n for n in nodes if not NODE_NAME.fullmatch(n) or ".." in n]
    if bad:
        raise ConfigError(
            f"certs: expected node names of letters, digits, '.', '_' and '-' (at most 64, no '..' or '/'), got {bad}"
        )
    if not nodes or len(set(nodes)) != len(nodes):
        raise ConfigError(f"certs: expected distinct node names, got {nodes}")
    clash = sorted(n for n in nodes if n.endswith(".pub") and n[: -len(".pub")] in nodes)
    if clash:
        raise ConfigError(
            f"certs: expected node names whose key files differ, got {clash} beside "
            f"{[n[:-4] for n in clash]} (whose public key would be {clash[0]})"
        )


def check_node_names_free(out: Path, nodes: list[str]) -> None:
    """Valid, distinct names whose key files do not exist yet under out/nodes/."""
    check_node_names(nodes)
    taken = [str(out / "nodes" / f) for n in nodes for f in (n, f"{n}.pub") if (out / "nodes" / f).exists()]
    if taken:
        raise ConfigError(f"certs: expected new node names, but {taken} exist; refusing to overwrite them")


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"certs: expected a directory, got the file {out}")
    if (out / "nodes").exists() and not (out / "nodes").is_dir():
        raise ConfigError(f"certs: expected {out / 'nodes'} to be a directory, got a file")


def make_node_key_pairs(out: Path, *, nodes: list[str]) -> None:
    """Only the node key pairs, into out/nodes/ (an existing deployment folder or a new one)."""
    check_out(out)
    check_node_names_free(out, nodes)
    with staged(out) as tmp:
        (tmp / "nodes").mkdir()
        for name in nodes:
            make_node_keys(tmp / "nodes", name)


def make_deployment_pki(out: Path, *, nodes: list[str], hosts: list[str]) -> None:
    check_hosts(hosts)
    check_node_names(nodes)
    check_out(out)
    existing = [f for f in ("ca.crt", "ca.key", "server.crt", "server.key") if (out / f).exists()]
    if existing:
        raise ConfigError(
            f"certs: expected a new directory, but {out} holds {existing}; refusing to replace a "
            "deployment's CA (add nodes to it with --keys-only)"
        )
    check_node_names_free(out, nodes)
    with staged(out) as tmp:
        (tmp / "nodes").mkdir()
        ca_cert, ca_key = make_ca(tmp)
        make_server_cert(tmp, ca_cert, ca_key, hosts=hosts)
        for name in nodes:
            make_node_keys(tmp / "nodes", name)


class staged:
    """A temporary folder beside `out` to build in; on success its files are linked into `out`
    (created exclusively: an existing file is never replaced) and the folder removed; on any failure
    whatever was linked is removed again, so `out` is as it was."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __enter__(self) -> Path:
        parent = self.out.parent if self.out.parent != Path("") else Path(".")
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=parent))
        except OSError as err:
            raise ConfigError(f"certs: expected a place to write {self.out}, got {err.strerror or err}") from None
        return self.tmp

    def __exit__(self, kind, error, trace) -> None:
        try:
            if kind is None:
                self._publish()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _publish(self) -> None:
        linked: list[Path] = []
        made = [] if self.out.exists() else [self.out]
        try:
            for src in sorted(p for p in self.tmp.rglob("*") if p.is_file()):
                dst = self.out / src.relative_to(self.tmp)
                if not dst.parent.exists():
                    made.append(dst.parent)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(src, dst)  # fails if dst exists: nothing is replaced
                linked.append(dst)
        except OSError as err:
            for path in linked:
                path.unlink(missing_ok=True)
            for folder in reversed(made):
                shutil.rmtree(folder, ignore_errors=True) if folder == self.out else _rmdir_if_empty(folder)
            raise ConfigError(
                f"certs: could not write {self.out} ({err.strerror or err}); nothing was written"
            ) from None


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
