"""A real HTTP(S) server on 127.0.0.1 for tests: `with serve(Handler) as (base_url, port): ...`.

`tls_cert(dir)` writes a self-signed certificate for 127.0.0.1 (``serve(Handler, tls=...)`` serves HTTPS with it;
point ``SSL_CERT_FILE`` at it so urllib's default context trusts it)."""

from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import ssl
import threading
import time
from pathlib import Path


class Handler(http.server.BaseHTTPRequestHandler):
    """A quiet HTTP/1.0 request handler with a one-call reply."""

    protocol_version = "HTTP/1.0"

    def reply(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_repeated(self, chunk: bytes, count: int, delay: float = 0.0) -> int:
        """Write `chunk` `count` times, each flushed, `delay` s apart; return the bytes sent before the client hung
        up (a big body cut short, or a body dribbled slowly)."""
        sent = 0
        try:
            for _ in range(count):
                self.wfile.write(chunk)
                self.wfile.flush()
                sent += len(chunk)
                if delay:
                    time.sleep(delay)
        except OSError:
            pass
        return sent

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(handler_class, tls: tuple[Path, Path] | None = None):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    srv.daemon_threads = True
    scheme = "http"
    if tls is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*map(str, tls))
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        scheme = "https"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"{scheme}://127.0.0.1:{srv.server_address[1]}", srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def tls_cert(directory: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem): a self-signed certificate for IP 127.0.0.1, valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = Path(directory) / "cert.pem", Path(directory) / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
