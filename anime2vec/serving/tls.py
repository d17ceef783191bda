"""TLS for every gRPC hop: a server's credentials (its certificate and key, plus a CA that client
certificates must chain to for mutual TLS), and `open_channel`, the one function every client uses
to dial a service, in plaintext or over TLS.

Certificates and keys are PEM files, read once when the server or channel is created: rotate them
with a rolling restart. `check_*` validate them with the standard library's OpenSSL, so a missing,
garbled or mismatched file is reported at start-up instead of failing every handshake later.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc


class TLSFileError(ValueError):
    """A certificate, key or CA file is missing or unusable; the message names the file."""


def _readable(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise TLSFileError(f"{path} is not a readable file")
    try:
        path.read_bytes()
    except OSError as e:
        raise TLSFileError(f"{path} cannot be read: {e.strerror or e}") from None
    return path


def check_certificates(path: Path) -> Path:
    """`path` holds at least one PEM certificate (a chain, or a CA bundle)."""
    path = _readable(path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
    except ssl.SSLError as e:
        raise TLSFileError(f"{path} holds no valid PEM certificate ({e.reason or e})") from None
    return path


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise TLSFileError("the private key is encrypted; gRPC needs an unencrypted PEM key")


def check_key_pair(cert_file: Path, key_file: Path) -> None:
    """`key_file` holds an unencrypted PEM private key matching the first certificate of `cert_file`."""
    cert_file, key_file = check_certificates(cert_file), _readable(key_file)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert_file), str(key_file), password=_no_password)
    except TLSFileError as e:
        raise TLSFileError(f"{key_file}: {e}") from None
    except ssl.SSLError as e:
        reason = "does not match the certificate" if "MISMATCH" in str(e) else "holds no valid PEM private key"
        raise TLSFileError(f"{key_file} {reason} ({e.reason or e})") from None


@dataclass(frozen=True)
class ServerTLS:
    """What a server presents, and (mutual TLS) which CA its clients' certificates must chain to."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    @property
    def mode(self) -> str:
        return "mutual TLS" if self.client_ca_file is not None else "TLS"

    def credentials(self) -> grpc.ServerCredentials:
        ca = Path(self.client_ca_file).read_bytes() if self.client_ca_file is not None else None
        return grpc.ssl_server_credentials(
            [(Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


@dataclass(frozen=True)
class ClientTLS:
    """How a client verifies the server (ca_file; None: the public roots bundled with gRPC), the
    certificate it presents for mutual TLS (cert_file + key_file), and the name it expects in the
    server's certificate when that differs from the dialled host (server_name)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""

    def check(self) -> ClientTLS:
        """Self, after checking every file; TLSFileError names the first bad one."""
        if self.ca_file is not None:
            check_certificates(self.ca_file)
        if (self.cert_file is None) != (self.key_file is None):
            raise TLSFileError("a client certificate needs both its certificate and its key file")
        if self.cert_file is not None and self.key_file is not None:  # both or neither, checked above
            check_key_pair(self.cert_file, self.key_file)
        return self

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: Path | None) -> bytes | None:
            return None if p is None else Path(p).read_bytes()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )


def open_channel(address: str, tls: ClientTLS | None, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A channel to `address`: plaintext when `tls` is None, else TLS with `tls`'s credentials."""
    options = list(options)
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, tls.credentials(), options=options)
