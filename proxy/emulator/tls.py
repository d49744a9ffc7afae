"""A throwaway certificate authority and a loopback server certificate, so the emulator can speak HTTPS.

Entra ID clients (azure-identity) refuse a plain-HTTP authority, so the Entra stand-in always needs TLS. Nothing
here is meant to be trusted beyond one emulator run: the CA's key is kept only in memory and dropped once the
server certificate is signed; the server key is written next to the certificate (mode 0600) because
`ssl.SSLContext.load_cert_chain` only reads files. Clients trust `ca_file`.

Keys are ECDSA P-256: quick to make, so every emulator start can have its own CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.emulator.secretdir import write_private

DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")
VALIDITY = datetime.timedelta(days=365)
# Backdated a little, so a client whose clock is slightly behind still accepts the certificate.
BACKDATE = datetime.timedelta(hours=1)


@dataclass(frozen=True, kw_only=True)
class LocalTls:
    """Files of one throwaway PKI: the CA certificate clients trust, and the server's certificate and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _certificate(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    valid: tuple[datetime.datetime, datetime.datetime],
    *,
    ca: bool,
) -> x509.CertificateBuilder:
    """A certificate for `key` valid from `valid[0]` to `valid[1]`: a CA's (it signs certificates, no
    intermediates below it) or an end entity's (it signs TLS handshakes); the caller adds the rest and signs."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )


def make_local_tls(directory: Path, *, hosts: Sequence[str] = DEFAULT_HOSTS) -> LocalTls:
    """Make a CA and a server certificate for `hosts` (IPs become IP SANs) and write them into `directory`."""
    if not hosts:
        raise ValueError("hosts must not be empty")
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - BACKDATE, now + VALIDITY)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aml-auth-proxy emulator throwaway CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        _certificate(ca_name, ca_name, ca_key, valid, ca=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    server_cert = (
        _certificate(server_name, ca_name, server_key, valid, ca=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    directory.mkdir(parents=True, exist_ok=True)
    tls = LocalTls(ca_file=directory / "ca.pem", cert_file=directory / "server.pem", key_file=directory / "server.key")
    tls.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    tls.cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    write_private(
        tls.key_file,
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    return tls
