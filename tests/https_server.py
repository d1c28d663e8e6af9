"""A real HTTPS server on 127.0.0.1 for tests, with a self-signed certificate and scripted replies.

Mirror failures (HTML pages, truncated or wrong files, 404s, slow answers) are reproduced by a real
TLS server instead of mocks, so the whole client path runs: DNS-free connection, TLS handshake and
certificate check, HTTP status, streaming, timeouts.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Certificate:
    """PEM files of a self-signed certificate valid for the IP address 127.0.0.1."""

    cert_file: Path
    key_file: Path


def make_certificate(folder: Path) -> Certificate:
    """Write a self-signed certificate for 127.0.0.1 (its own CA, so it can be a trust bundle by itself)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pytest local mirror")])
    now = datetime.datetime.now(datetime.UTC)
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_file = folder / "cert.pem"
    key_file = folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Certificate(cert_file, key_file)


@dataclass(frozen=True)
class Reply:
    """What the server answers for one path."""

    body: bytes = b""
    status: int = 200
    content_type: str = "application/octet-stream"
    delay: float = 0.0  # seconds to wait before answering; cut short when the server stops


NOT_FOUND = Reply(b"<html><body>404 Not Found</body></html>", 404, "text/html")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a client that stalls cannot pin a handler thread for long

    def setup(self) -> None:
        # The TLS handshake runs here, in the handler thread, not in the accepting thread.
        super().setup()
        self.request.do_handshake()

    def do_GET(self) -> None:
        owner = self.server.owner
        with owner.lock:
            owner.requests.append(self.path)
            reply = owner.routes.get(self.path, NOT_FOUND)
        if reply.delay:
            owner.stopping.wait(reply.delay)
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the client gave up (timeout): that is what the test wanted

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    owner: HTTPSServer

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # aborted handshakes and client timeouts are expected in fault-injection tests


class HTTPSServer:
    """A threaded HTTPS server on 127.0.0.1 (random port) answering GETs from `routes`, logging each path."""

    def __init__(self, certificate: Certificate) -> None:
        self.routes: dict[str, Reply] = {}
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate.cert_file, certificate.key_file)
        self._httpd = _Server((HOST, 0), _Handler)
        self._httpd.owner = self
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True, do_handshake_on_connect=False)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, prefix: str = "/") -> str:
        """The base URL of the folder `prefix` on this server."""
        return f"https://{HOST}:{self.port}{prefix}"

    def serve(self, prefix: str, names: list[str] | tuple[str, ...], reply: Callable[[str], Reply]) -> None:
        """Answer `<prefix><name>.gz` with `reply(name)` for every name."""
        with self.lock:
            for name in names:
                self.routes[f"{prefix}{name}.gz"] = reply(name)

    def start(self) -> HTTPSServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@contextmanager
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that is bound but not listening: connecting to it is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        yield sock.getsockname()[1]
