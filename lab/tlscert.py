"""A throwaway self-signed TLS certificate for one lab run's XMPP server.

Real XMPP servers require TLS, so the lab's does too; the certificate lives
in the run directory and dies with it. The lab's clients trust this one
certificate and nothing else (no public CA store): it is pinned, not looked
up. Made with the ``openssl`` command (Debian's prosody depends on it, via
ssl-cert), so the lab needs no Python crypto library.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from appliance import netns


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path
    domain: str


def make(directory: Path, domain: str, days: int = 2) -> Cert:
    """A new EC P-256 key and a certificate for ``domain`` (CN and subjectAltName) in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{domain}.crt", directory / f"{domain}.key"
    netns.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
               "-days", str(days), "-subj", f"/CN={domain}", "-addext", f"subjectAltName=DNS:{domain}",
               "-keyout", str(key), "-out", str(cert)], timeout=30)
    key.chmod(0o600)
    return Cert(cert, key, domain)


def client_context(cert: Path) -> ssl.SSLContext:
    """A client context that trusts exactly ``cert`` (checked against the server's name) and no CA store."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # check_hostname and CERT_REQUIRED are on
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(cert))
    return ctx
