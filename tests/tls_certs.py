"""Test PKI made with the `openssl` command (the same commands docs/RELIABILITY.md gives operators):
a mesh CA, certificates it signs for a server ("stage", valid for 127.0.0.1 and localhost), the
coordinator ("coordinator") and an unexpected client ("mallory"), plus a stranger CA with a
"coordinator" certificate of its own. EC P-256 keys; every leaf may serve and be a client."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pqmesh.security import Credentials

LEAF_EXT = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = {san}
"""
CA_EXT = """basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    stranger_ca: Path
    stage: Identity  # CN=stage, SAN 127.0.0.1 / localhost: what every test server presents
    coordinator: Identity  # CN=coordinator, signed by the mesh CA
    mallory: Identity  # CN=mallory, signed by the mesh CA (right CA, CN not allowed)
    stranger: Identity  # CN=coordinator, signed by the stranger CA
    token_file: Path
    token: str

    def server(self, token: bool = True, mutual: bool = True) -> Credentials:
        return Credentials.from_files(self.stage.cert, self.stage.key, self.ca if mutual else None,
                                      self.token_file if token else None)

    def client(self, who: Identity | None, token: bool = True, ca: Path | None = None) -> Credentials:
        return Credentials.from_files(who.cert if who else None, who.key if who else None, ca or self.ca,
                                      self.token_file if token else None)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _key(directory: Path, name: str) -> Path:
    path = directory / f"{name}.key"
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path), cwd=directory)
    return path


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key = _key(directory, name)
    (directory / "ca.ext").write_text(CA_EXT)
    _openssl("req", "-new", "-key", str(key), "-subj", f"/CN={name}", "-out", f"{name}.csr", cwd=directory)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-signkey", str(key), "-extfile", "ca.ext", "-days", "2",
             "-out", f"{name}.pem", cwd=directory)
    return directory / f"{name}.pem", key


def _leaf(
    directory: Path, name: str, cn: str, ca: tuple[Path, Path], san: str = "DNS:localhost,IP:127.0.0.1"
) -> Identity:
    key = _key(directory, name)
    (directory / f"{name}.ext").write_text(LEAF_EXT.format(san=san))
    _openssl("req", "-new", "-key", str(key), "-subj", f"/CN={cn}", "-out", f"{name}.csr", cwd=directory)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-extfile", f"{name}.ext", "-days", "2", "-out", f"{name}.pem", cwd=directory)
    return Identity(directory / f"{name}.pem", key)


def make_pki(directory: Path) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "mesh-ca")
    stranger_ca = _ca(directory, "stranger-ca")
    token = "t0ken-" + "ab" * 16
    token_file = directory / "token"
    token_file.write_text(token + "\n")
    return Pki(ca[0], stranger_ca[0], _leaf(directory, "stage", "stage", ca),
               _leaf(directory, "coordinator", "coordinator", ca), _leaf(directory, "mallory", "mallory", ca),
               _leaf(directory, "stranger", "coordinator", stranger_ca), token_file, token)
