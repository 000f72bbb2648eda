"""What the downloader may fetch, and how much work one URL may cost.

Policy, checked for the first URL *and every redirect target*:

1. :meth:`UrlPolicy.check_url` - before any network use: scheme http/https, a host, not a blocklisted domain
   (subdomains included), and, for literal IP hosts, a public address.  The host is first computed exactly as
   urllib and http.client will use it (:func:`client_host`: the authority percent-decoded, the port split off,
   IDNA-encoded, lower-cased, trailing dots removed), so ``blocked%2eexample``, ``BLOCKED.example.`` and
   ``blocked\\uff0eexample`` all meet the blocklist.
2. :func:`safe_urlopen` - a context manager: while it lasts, urllib's global opener in this process (img2dataset
   fetches with ``urllib.request.urlopen``) is one that obeys the policy; after it, urlopen builds its default
   opener again.  Its connections re-check the host they are given, resolve it, refuse it unless *every* resolved
   address is public (or inside ``download.allow_networks``), then connect to the checked address itself, so DNS
   answers cannot point a fetch at 10.x, 127.x, 169.254.169.254 and the like.  IPv6 forms that carry an IPv4
   address (mapped ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``,
   Teredo) are judged by that IPv4 address; site-local ``fec0::/10`` and every other non-global range are
   refused.  No packet is ever sent to a refused address.
3. Redirects: only to http(s) (``bad_redirect``), never back to a URL of the same chain (``redirect_loop``), at
   most :attr:`_SafeRedirectHandler.max_redirections` (``too_many_redirects``).

Bounds, per URL (the opener's responses are :class:`BoundedResponse`): the body is read at most up to
``max_bytes`` (a larger Content-Length is refused before reading, a body without one is cut at ``max_bytes + 1``
bytes) -> ``too_large_file``; and one wall-clock deadline covers connect, every redirect, headers and body ->
``timeout``, so a server that dribbles a byte a second cannot hold a download thread.

Refusals raise :class:`Refused`, whose message starts ``lvd:<reason>`` so the download stage maps it to a drop
reason from the ``download`` vocabulary in :mod:`schemas.tables`.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import time
import urllib.request
import weakref
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit

ALLOW_KEY = "download.allow_networks"

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_HOST_FORBIDDEN = set("@/\\?#%[]:") | {chr(c) for c in range(33)} | {"\x7f"}


class Refused(OSError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"lvd:{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def normalize_host(host: str) -> str:
    """The host name a resolver sees: IDNA (what socket.getaddrinfo encodes non-ASCII names with), lower case, no
    trailing dot; IP literals in their canonical form.  Raises Refused('bad_url') for what no client could use."""
    if ":" in host:  # only an IPv6 literal may hold a colon here
        try:
            return str(ipaddress.IPv6Address(host.split("%", 1)[0]))
        except ValueError:
            raise Refused("bad_url", f"bad IPv6 host {host[:200]!r}") from None
    bad = sorted(set(host) & _HOST_FORBIDDEN)
    if bad:
        raise Refused("bad_url", f"host {host[:200]!r} contains {''.join(bad)!r}")
    try:
        name = host.encode("idna").decode("ascii")
    except UnicodeError as err:
        raise Refused("bad_url", f"host {host[:200]!r} is not a valid IDNA name: {err}") from None
    name = name.lower().rstrip(".")
    if not name:
        raise Refused("bad_url", f"empty host {host!r}")
    return name


def client_host(url: str) -> str:
    """The normalised host urllib + http.client connect to for `url` (urllib percent-decodes the authority)."""
    netloc = unquote(urlsplit(url).netloc)
    if "@" in netloc:  # urllib hands 'user@host' to http.client as the host name: refuse it plainly
        raise Refused("bad_url", f"userinfo in URL {url[:200]!r}")
    i, j = netloc.rfind(":"), netloc.rfind("]")
    host = netloc[:i] if i > j else netloc  # http.client.HTTPConnection._get_hostport
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise Refused("bad_url", f"no host in {url[:200]!r}")
    return normalize_host(host)


def _ipv4_kind(ip: ipaddress.IPv4Address) -> str | None:
    """None for a public IPv4 address, else words for what it is."""
    if ip.is_global and not ip.is_multicast:
        return None
    return (
        "cloud metadata" if str(ip) == "169.254.169.254"
        else "loopback" if ip.is_loopback
        else "link-local" if ip.is_link_local
        else "private" if ip.is_private
        else "non-public"
    )


def non_public_kind(ip) -> str | None:
    """None when `ip` is a public unicast address, else words for why not (embedded IPv4 unwrapped)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return _ipv4_kind(ip)
    wrapped = (
        ("IPv4-mapped", ip.ipv4_mapped) if ip.ipv4_mapped is not None
        else ("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)) if ip in _NAT64
        else ("6to4", ip.sixtofour) if ip.sixtofour is not None
        else ("Teredo", ip.teredo[1]) if ip.teredo is not None
        else None
    )
    if wrapped is not None:
        label, v4 = wrapped
        kind = _ipv4_kind(v4)
        return f"{kind} address ({v4}) inside a {label}" if kind else None
    if ip in _IPV4_COMPATIBLE:
        return "loopback" if ip.is_loopback else "unspecified" if ip.is_unspecified else "IPv4-compatible (deprecated)"
    if ip.is_site_local:
        return "site-local"
    if ip in _NAT64_LOCAL:
        return "local-use NAT64"
    if str(ip) == "fd00:ec2::254":
        return "cloud metadata"
    if not ip.is_global or ip.is_multicast or ip.is_reserved:
        return (
            "loopback" if ip.is_loopback
            else "link-local" if ip.is_link_local
            else "private" if ip.is_private
            else "non-public"
        )
    return None


class UrlPolicy:
    def __init__(self, allow_networks=(), blocklist_domains=(), blocklist_file: Path | None = None):
        self.allow = [ipaddress.ip_network(n, strict=False) for n in allow_networks]
        lines = list(blocklist_domains)
        if blocklist_file is not None:
            lines += [line.split("#", 1)[0] for line in Path(blocklist_file).read_text().splitlines()]
        domains = set()
        for line in lines:
            line = line.strip()
            if line:
                try:
                    domains.add(normalize_host(line))
                except Refused:
                    domains.add(line.lower().rstrip("."))
        self.blocked = frozenset(domains)
        self._open: weakref.WeakSet = weakref.WeakSet()  # connections made, for abandon()
        self._abandoned = False

    @classmethod
    def from_config(cls, dl_cfg) -> "UrlPolicy":
        return cls(dl_cfg.allow_networks, dl_cfg.blocklist_domains, dl_cfg.blocklist_file)

    def is_blocked_domain(self, host: str) -> bool:
        parts = host.split(".")
        return any(".".join(parts[i:]) in self.blocked for i in range(len(parts)))

    def _allowed(self, ip) -> bool:
        return any(ip.version == net.version and ip in net for net in self.allow)

    def check_ip(self, ip_text: str) -> None:
        ip = ipaddress.ip_address(ip_text.split("%", 1)[0])
        if self._allowed(ip):
            return
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None and self._allowed(ip.ipv4_mapped):
            return  # a mapped address is an IPv4 connection to that address
        kind = non_public_kind(ip)
        if kind:
            raise Refused("private_address", f"{ip} is a {kind} address (not in {ALLOW_KEY})")

    def check_host(self, host: str) -> str:
        """Normalise `host` as a client would and check it against the blocklist and, if an IP literal, the
        address policy; return the normalised host."""
        host = normalize_host(host)
        if self.is_blocked_domain(host):
            raise Refused("blocked_domain", host)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return host  # a hostname: its addresses are checked after resolution, at connect time
        self.check_ip(host)
        return host

    def check_url(self, url) -> None:
        """Raise Refused unless `url` is a well-formed http(s) URL to an allowed host."""
        if not isinstance(url, str) or not url.strip():
            raise Refused("bad_url", "empty URL")
        if any(c in url for c in " \t\r\n"):
            raise Refused("bad_url", f"whitespace in URL {url[:200]!r}")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as err:
            raise Refused("bad_url", f"{err}: {url[:200]!r}") from None
        if parts.scheme.lower() not in ("http", "https"):
            raise Refused("bad_url", f"scheme {parts.scheme or '(none)'!r} is not http/https: {url[:200]!r}")
        self.check_host(client_host(url))

    # -- abandoning fetches ------------------------------------------------------------------------------------
    def abandon(self) -> None:
        """Stop every fetch of this policy now (an interrupted run): the open connections are shut down, so a
        thread blocked reading one returns at once, and no new connection is made."""
        self._abandoned = True
        for sock in list(self._open):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # -- connect-time checks -----------------------------------------------------------------------------------
    def safe_create_connection(self, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **_):
        host, port = address
        if self._abandoned:
            raise OSError("fetch abandoned: the run was interrupted")
        self.check_host(host)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise OSError(f"cannot resolve {host}: {err}") from None
        for info in infos:  # refuse if any answer is private: no mixing public and private records
            self.check_ip(info[4][0])
        last = None
        for family, socktype, proto, _, sockaddr in infos:
            sock = socket.socket(family, socktype, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                self._open.add(sock)
                sock.connect(sockaddr)
                return sock
            except OSError as err:
                last = err
                sock.close()
        raise last or OSError(f"cannot connect to {host}")


# -- bounded work per URL --------------------------------------------------------------------------------------
class _Deadline:
    """The wall-clock end of one URL's fetch (all its redirects included)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        if self.end is None:
            return None
        left = self.end - time.monotonic()
        if left <= 0:
            raise Refused("timeout", f"no complete response within {self.seconds:g} s (download.deadline_s)")
        return left

    def clamp(self, timeout):
        """A per-operation socket timeout that also ends at the deadline."""
        left = self.remaining()
        if left is None:
            return timeout
        if timeout is None or timeout is socket._GLOBAL_DEFAULT_TIMEOUT:
            return left
        return min(timeout, left)


class _DeadlineReader(io.RawIOBase):
    """The socket's raw reader, each read bounded by the deadline (so headers dribbled a byte at a time are too)."""

    def __init__(self, raw, sock, deadline: _Deadline):
        self.raw, self.sock, self.deadline = raw, sock, deadline
        self.per_op = sock.gettimeout()

    def readable(self):
        return True

    def readinto(self, b):
        self.sock.settimeout(self.deadline.clamp(self.per_op))
        try:
            return self.raw.readinto(b)
        except TimeoutError:
            self.deadline.remaining()  # raises Refused('timeout') when the deadline, not the socket, ran out
            raise

    def close(self):
        self.raw.close()
        super().close()


class BoundedResponse(http.client.HTTPResponse):
    """An HTTP response whose reads stop at `max_bytes` and at the URL's deadline."""

    def __init__(self, sock, *args, max_bytes: int | None = None, deadline: _Deadline | None = None, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.max_bytes = max_bytes
        if deadline is not None and deadline.end is not None:
            raw = self.fp.detach()
            self.fp = io.BufferedReader(_DeadlineReader(raw, sock, deadline))

    def read(self, amt=None):
        if amt is not None and amt >= 0 or self.max_bytes is None:
            return super().read(amt)
        if self.length is not None:
            if self.length > self.max_bytes:
                self.close()
                raise Refused("too_large_file",
                              f"Content-Length {self.length} bytes > {self.max_bytes} (download.max_bytes)")
            return super().read()  # one allocation of the declared size
        chunks, total = [], 0
        while True:
            chunk = super().read(min(1 << 20, self.max_bytes + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if total > self.max_bytes:
                self.close()
                raise Refused("too_large_file", f"more than {self.max_bytes} bytes (download.max_bytes)")


def _connection_class(base, policy: UrlPolicy, max_bytes, deadline: _Deadline):
    class SafeConnection(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = self._bounded_connect
            self.response_class = partial(BoundedResponse, max_bytes=max_bytes, deadline=deadline)

        @staticmethod
        def _bounded_connect(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, *args, **kwargs):
            return policy.safe_create_connection(address, deadline.clamp(timeout), *args, **kwargs)

    return SafeConnection


class _SafeRedirectHandler(urllib.request.HTTPRedirectHandler):
    max_redirections = 5

    def __init__(self, policy: UrlPolicy):
        self.policy = policy

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location is not None:
            scheme = urlsplit(location.strip()).scheme.lower()
            if scheme not in ("http", "https", ""):
                fp.close()
                raise Refused("bad_redirect", f"{code} redirect to a {scheme}: URL {location[:200]!r}")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        chain = [getattr(req, "lvd_first_url", req.full_url), *getattr(req, "redirect_dict", {})]
        if newurl in chain or newurl == req.full_url:
            fp.close()
            raise Refused("redirect_loop", f"{code} redirect back to {newurl[:200]!r} after {len(chain)} URL(s)")
        if len(chain) > self.max_redirections:
            fp.close()
            raise Refused("too_many_redirects", f"more than {self.max_redirections} redirects from {chain[0][:200]!r}")
        self.policy.check_url(newurl)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.lvd_first_url = chain[0]
            new.lvd_deadline = getattr(req, "lvd_deadline", None)
        return new


def build_safe_opener(
    policy: UrlPolicy, use_env_proxy: bool = False, max_bytes: int | None = None, deadline_s: float | None = None
) -> urllib.request.OpenerDirector:
    """An opener that obeys `policy`; bodies capped at `max_bytes`, each URL (redirects included) at `deadline_s`."""

    def deadline_of(req) -> _Deadline:
        if getattr(req, "lvd_deadline", None) is None:
            req.lvd_deadline = _Deadline(deadline_s)
        return req.lvd_deadline

    def connection(base, req):
        return _connection_class(base, policy, max_bytes, deadline_of(req))

    class SafeHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            policy.check_url(req.full_url)
            return self.do_open(connection(http.client.HTTPConnection, req), req)

    class SafeHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            policy.check_url(req.full_url)
            return self.do_open(connection(http.client.HTTPSConnection, req), req, context=self._context)

    handlers = [SafeHTTPHandler(), SafeHTTPSHandler(), _SafeRedirectHandler(policy)]
    if not use_env_proxy:
        handlers.append(urllib.request.ProxyHandler({}))
    opener = urllib.request.build_opener(*handlers)
    # build_opener adds default handlers for schemes we did not override (ftp, file, data): drop them.
    opener.handlers = [h for h in opener.handlers if not isinstance(h, (urllib.request.FTPHandler,
                       urllib.request.FileHandler, urllib.request.DataHandler))]
    for scheme in ("ftp", "file", "data"):
        opener.handle_open.pop(scheme, None)
    return opener


@contextmanager
def safe_urlopen(policy: UrlPolicy, use_env_proxy: bool = False, max_bytes: int | None = None,
                 deadline_s: float | None = None) -> Iterator[None]:
    """While it lasts, urllib.request.urlopen (as used by img2dataset) in this process obeys `policy` and the
    bounds; after it, urlopen builds its default opener again (an in-process run does not leak the policy)."""
    urllib.request.install_opener(build_safe_opener(policy, use_env_proxy, max_bytes, deadline_s))
    try:
        yield
    finally:
        urllib.request.install_opener(None)
