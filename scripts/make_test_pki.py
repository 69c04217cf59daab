"""Certificates for trying TLS on one machine (the tests, the benchmarks, the Security docs' walk-through), made
with the openssl command line: a root CA, a server certificate for 127.0.0.1 / localhost, client certificates
(a modality, a PACS), and the bad ones a test must see refused: a client of another root, an expired client.
Keys are written 0600, as xray-serve requires. Never for production: a real site's CA issues the certificates.

    python scripts/make_test_pki.py OUT_DIR
"""
from __future__ import annotations

import base64
import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import click


def _openssl(*args, cwd: Path):
    proc = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"openssl {' '.join(map(str, args))}: {proc.stderr}"


@dataclass
class Pair:
    cert: Path
    key: Path

    @property
    def pem(self) -> Path:
        """Certificate and key in one file (Orthanc's SslCertificate)."""
        out = self.cert.with_suffix(".pem")
        if not out.exists():
            out.write_bytes(self.key.read_bytes() + self.cert.read_bytes())
            os.chmod(out, 0o600)
        return out

    def spki_sha256(self) -> str:
        """base64 SHA-256 of the public key: what Chromium's --ignore-certificate-errors-spki-list takes."""
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-pubkey", "-noout"], capture_output=True,
                             check=True).stdout
        der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=der, capture_output=True,
                             check=True).stdout
        return base64.b64encode(hashlib.sha256(der).digest()).decode()


class CertFactory:
    """make(folder) -> a CA; .issue(name, cn, ...) -> a Pair signed by it."""

    def __init__(self, folder: Path, name: str = "ca", cn: str = "xray-test-root"):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ca = Pair(folder / f"{name}.crt", folder / f"{name}.key")
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.ca.key, "-out", self.ca.cert,
                 "-days", 30, "-subj", f"/CN={cn}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
        os.chmod(self.ca.key, 0o600)

    @classmethod
    def of(cls, ca: Pair) -> CertFactory:
        """A factory issuing from an existing CA (its files beside the new ones)."""
        factory = cls.__new__(cls)
        factory.folder, factory.ca = ca.cert.parent, ca
        return factory

    def issue(self, name: str, cn: str, server: bool = False, expired: bool = False, org: str = "") -> Pair:
        pair = Pair(self.folder / f"{name}.crt", self.folder / f"{name}.key")
        csr, ext = self.folder / f"{name}.csr", self.folder / f"{name}.ext"
        subj = f"/CN={cn}" + (f"/O={org}" if org else "")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", pair.key, "-out", csr, "-subj", subj, cwd=self.folder)
        ext.write_text("extendedKeyUsage=serverAuth,clientAuth\n" + ("subjectAltName=IP:127.0.0.1,DNS:localhost\n" if server else ""))
        dates = ["-days", -1 if expired else 30]  # -1: its notAfter a day before now (OpenSSL 3.0 has no -not_after)
        _openssl("x509", "-req", "-in", csr, "-CA", self.ca.cert, "-CAkey", self.ca.key, "-CAcreateserial",
                 *dates, "-out", pair.cert, "-extfile", ext, cwd=self.folder)
        os.chmod(pair.key, 0o600)
        return pair


@dataclass
class TestPki:
    """Everything the TLS tests use, made once per session."""

    ca: Pair
    server: Pair  # CN=localhost, SAN IP:127.0.0.1 (the node, xray-serve's HTTPS, Orthanc, storescp)
    modality: Pair  # CN=MODALITY, signed by ca
    pacs: Pair  # CN=ORTHANC, SAN 127.0.0.1, signed by ca (Orthanc's identity as server and as client)
    rogue_ca: Pair
    rogue: Pair  # CN=MODALITY, signed by another root
    expired: Pair  # CN=MODALITY, signed by ca, expired


def make_pki(folder: Path) -> TestPki:
    ca = CertFactory(folder, "ca", "xray-test-root")
    rogue_ca = CertFactory(folder / "rogue", "rogue-ca", "rogue-root")
    return TestPki(ca=ca.ca, server=ca.issue("server", "localhost", server=True),
                   modality=ca.issue("modality", "MODALITY", org="Radiology"), pacs=ca.issue("pacs", "ORTHANC", server=True),
                   rogue_ca=rogue_ca.ca, rogue=rogue_ca.issue("rogue", "MODALITY"),
                   expired=ca.issue("expired", "MODALITY", expired=True))


@click.command(help="A test CA, server and client certificates (openssl) in OUT_DIR: for trying TLS, never production.")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
def main(out_dir: Path):
    pki = make_pki(out_dir)
    for name, pair in vars(pki).items():
        print(f"{name:9s} {pair.cert}  {pair.key}")


if __name__ == "__main__":
    main()
