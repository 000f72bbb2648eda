"""What the downloader may fetch: URL syntax, domain blocklist, and no private or metadata addresses.

Two layers, both checked for the first URL *and every redirect target*:

1. :meth:`UrlPolicy.check_url` - before any network use: scheme http/https, a host, not a blocklisted domain
   (subdomains included), and, for literal IP hosts, a public address.
2. :func:`install_safe_opener` - replaces urllib's global opener in the worker process (img2dataset fetches with
   ``urllib.request.urlopen``).  Its connections resolve the host, refuse it unless *every* resolved address is
   public (or inside ``allow_networks``), then connect to the checked address itself, so DNS answers cannot point
   a fetch at 10.x, 127.x, 169.254.169.254 and the like.  No packet is ever sent to a refused address.

Refusals raise :class:`Refused`, whose message starts ``lvd:<reason>`` so the download stage maps it to a drop
reason (``bad_url``, ``blocked_domain``, ``private_address``).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import urllib.request
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit


class Refused(OSError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"lvd:{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class UrlPolicy:
    def __init__(self, allow_networks=(), blocklist_domains=(), blocklist_file: Path | None = None):
        self.allow = [ipaddress.ip_network(n, strict=False) for n in allow_networks]
        domains = {d.strip().lower().strip(".") for d in blocklist_domains if d.strip()}
        if blocklist_file is not None:
            for line in Path(blocklist_file).read_text().splitlines():
                line = line.split("#", 1)[0].strip().lower().strip(".")
                if line:
                    domains.add(line)
        self.blocked = frozenset(domains)

    @classmethod
    def from_config(cls, dl_cfg) -> "UrlPolicy":
        return cls(dl_cfg.allow_networks, dl_cfg.blocklist_domains, dl_cfg.blocklist_file)

    def is_blocked_domain(self, host: str) -> bool:
        parts = host.lower().strip(".").split(".")
        return any(".".join(parts[i:]) in self.blocked for i in range(len(parts)))

    def check_ip(self, ip_text: str) -> None:
        ip = ipaddress.ip_address(ip_text.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allow):
            return
        if not ip.is_global or ip.is_multicast:
            kind = (
                "cloud metadata" if str(ip) in ("169.254.169.254", "fd00:ec2::254")
                else "loopback" if ip.is_loopback
                else "link-local" if ip.is_link_local
                else "private" if ip.is_private
                else "non-public"
            )
            raise Refused("private_address", f"{ip} is a {kind} address")

    def check_url(self, url) -> None:
        """Raise Refused unless `url` is a well-formed http(s) URL to an allowed host."""
        if not isinstance(url, str) or not url.strip():
            raise Refused("bad_url", "empty URL")
        if any(c in url for c in " \t\r\n"):
            raise Refused("bad_url", f"whitespace in URL {url[:200]!r}")
        try:
            parts = urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as err:
            raise Refused("bad_url", f"{err}: {url[:200]!r}") from None
        if parts.scheme not in ("http", "https"):
            raise Refused("bad_url", f"scheme {parts.scheme or '(none)'!r} is not http/https: {url[:200]!r}")
        if not host:
            raise Refused("bad_url", f"no host in {url[:200]!r}")
        if self.is_blocked_domain(host):
            raise Refused("blocked_domain", host)
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return  # a hostname: checked after resolution, at connect time
        self.check_ip(host)

    # -- connect-time checks -----------------------------------------------------------------------------------
    def safe_create_connection(self, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **_):
        host, port = address
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
                sock.connect(sockaddr)
                return sock
            except OSError as err:
                last = err
                sock.close()
        raise last or OSError(f"cannot connect to {host}")


def _connection_class(base, policy: UrlPolicy):
    class SafeConnection(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = policy.safe_create_connection

    return SafeConnection


class _SafeRedirectHandler(urllib.request.HTTPRedirectHandler):
    max_redirections = 5

    def __init__(self, policy: UrlPolicy):
        self.policy = policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.policy.check_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def build_safe_opener(policy: UrlPolicy, use_env_proxy: bool = False) -> urllib.request.OpenerDirector:
    http_conn = _connection_class(http.client.HTTPConnection, policy)
    https_conn = _connection_class(http.client.HTTPSConnection, policy)

    class SafeHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            policy.check_url(req.full_url)
            return self.do_open(http_conn, req)

    class SafeHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            policy.check_url(req.full_url)
            return self.do_open(partial(https_conn), req, context=self._context)

    handlers = [SafeHTTPHandler(), SafeHTTPSHandler(), _SafeRedirectHandler(policy)]
    if not use_env_proxy:
        handlers.append(urllib.request.ProxyHandler({}))
    opener = urllib.request.build_opener(*handlers)
    # build_opener adds default handlers for schemes we did not override (ftp, file, data): drop them.
    opener.handlers = [h for h in opener.handlers if not isinstance(h, (urllib.request.FTPHandler,
                       urllib.request.FileHandler, urllib.request.DataHandler))]
    for attr in ("handle_open",):
        table = getattr(opener, attr)
        for scheme in ("ftp", "file", "data"):
            table.pop(scheme, None)
    return opener


def install_safe_opener(policy: UrlPolicy, use_env_proxy: bool = False) -> None:
    """Make urllib.request.urlopen (as used by img2dataset) in this process obey `policy`."""
    urllib.request.install_opener(build_safe_opener(policy, use_env_proxy))
