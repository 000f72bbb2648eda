"""The address policy refuses private, loopback, link-local and metadata targets before any packet is sent."""

import http.server
import threading
import urllib.error
import urllib.request

import pytest

from curation.rules.urlsafety import Refused, UrlPolicy, build_safe_opener, safe_urlopen
from tests.curation.loopback import Handler, serve, tls_cert


@pytest.mark.parametrize(
    "url, reason",
    [
        ("htp://broken", "bad_url"),
        ("http//missing-colon.jpg", "bad_url"),
        ("not a url", "bad_url"),
        ("http://", "bad_url"),
        ("http://host:99999/x", "bad_url"),
        ("file:///etc/passwd", "bad_url"),
        ("http://blocked.example/cat.jpg", "blocked_domain"),
        ("http://ads.Blocked.Example./x.jpg", "blocked_domain"),
        ("http://10.0.0.1/a.jpg", "private_address"),
        ("http://169.254.169.254/latest/meta-data/iam", "private_address"),
        ("http://127.0.0.1:8000/a.jpg", "private_address"),
        ("http://[::1]/a.jpg", "private_address"),
        ("http://[::ffff:10.0.0.1]/a.jpg", "private_address"),
        ("http://100.64.0.1/a.jpg", "private_address"),
        ("http://0.0.0.0/a.jpg", "private_address"),
    ],
)
def test_refused_before_fetch(url, reason):
    policy = UrlPolicy(blocklist_domains=["blocked.example"])
    with pytest.raises(Refused) as info:
        policy.check_url(url)
    assert info.value.reason == reason


def test_public_and_allowed():
    policy = UrlPolicy(allow_networks=["127.0.0.1/32"], blocklist_domains=["blocked.example"])
    policy.check_url("http://8.8.8.8/a.jpg")  # literal public IP: no resolution, no traffic
    policy.check_url("http://127.0.0.1:9/a.jpg")
    policy.check_url("https://notblocked.example/a.jpg")  # hostnames are checked at connect time
    with pytest.raises(Refused):
        policy.check_url("http://127.0.0.2/a.jpg")


class _Redirect(Handler):
    def do_GET(self):  # noqa: N802
        targets = {"/meta": "http://169.254.169.254/latest/meta-data/", "/ten": "http://10.0.0.7/x.jpg",
                   "/blocked": "http://blocked.example/x.jpg", "/ok": "/final"}
        if self.path in targets:
            self.reply(302, headers={"Location": targets[self.path]})
        else:
            self.reply(200, b"final")


@pytest.fixture(scope="module")
def server():
    with serve(_Redirect) as (base, _):
        yield base


def test_redirect_targets_are_checked(server):
    opener = build_safe_opener(UrlPolicy(allow_networks=["127.0.0.1/32"], blocklist_domains=["blocked.example"]))
    assert opener.open(f"{server}/ok", timeout=5).read() == b"final"
    for path, reason in (("/meta", "private_address"), ("/ten", "private_address"), ("/blocked", "blocked_domain")):
        with pytest.raises(Refused) as info:
            opener.open(f"{server}{path}", timeout=5)
        assert info.value.reason == reason


def test_safe_urlopen_applies_the_policy_only_while_it_lasts(server, monkeypatch):
    """urlopen (what img2dataset calls) obeys the policy inside the context, and builds its default opener again
    after it, also when the body raised: an in-process run does not leak the policy."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # the default opener reaches 127.0.0.1 directly
    with pytest.raises(RuntimeError, match="unit failed"):
        with safe_urlopen(UrlPolicy()):  # loopback not allowed
            with pytest.raises(OSError, match="lvd:private_address"):  # Refused, or URLError wrapping it
                urllib.request.urlopen(f"{server}/ok", timeout=5)
            raise RuntimeError("unit failed")
    with urllib.request.urlopen(f"{server}/ok", timeout=5) as r:
        assert r.read() == b"final"


def test_hostnames_are_checked_after_resolution(server):
    port = server.rsplit(":", 1)[1]
    opener = build_safe_opener(UrlPolicy())  # loopback not allowed
    with pytest.raises(urllib.error.URLError) as info:
        opener.open(f"http://localhost:{port}/ok", timeout=5)
    assert "lvd:private_address" in str(info.value)


# -- hosts are normalised exactly as the HTTP client will use them -----------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "http://blocked%2eexample/x.jpg",
        "http://blocked%2Eexample:8080/x.jpg",
        "http://ads.blocked%2eexample/x.jpg",
        "http://BLOCKED.EXAMPLE./x.jpg",
        "http://blocked.example%3a80/x.jpg",  # urllib decodes it to host blocked.example, port 80
        "http://blocked\uff0eexample/x.jpg",  # fullwidth dot: IDNA maps it to '.'
        "http://\uff42locked.example/x.jpg",  # fullwidth 'b': IDNA nameprep folds it
        "http://%62locked.example/x.jpg",
    ],
)
def test_blocklist_sees_the_host_the_client_uses(url):
    with pytest.raises(Refused) as info:
        UrlPolicy(blocklist_domains=["blocked.example"]).check_url(url)
    assert info.value.reason == "blocked_domain"


def test_percent_encoded_delimiters_and_userinfo_are_bad_urls():
    policy = UrlPolicy(blocklist_domains=["blocked.example"])
    for url in ("http://blocked.example%2fx/", "http://x%40blocked.example/", "http://user@8.8.8.8/x"):
        with pytest.raises(Refused) as info:
            policy.check_url(url)
        assert info.value.reason == "bad_url", url


# -- IPv4 addresses inside IPv6 forms, and every non-global range -----------------------------------
@pytest.mark.parametrize(
    "host",
    [
        "64:ff9b::a9fe:a9fe",  # NAT64 of the cloud metadata address
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "64:ff9b:1::a00:1",  # local-use NAT64
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "::a9fe:a9fe",  # IPv4-compatible
        "::7f00:1",
        "fec0::1",  # site-local
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo (client 192.0.2.45, a documentation address)
        "2001:db8::1",  # documentation
        "fc00::1",
        "fe80::1",
        "ff02::1",
    ],
)
def test_private_ipv4_inside_ipv6_is_refused(host):
    policy = UrlPolicy()
    with pytest.raises(Refused) as info:
        policy.check_url(f"http://[{host}]/a.jpg")
    assert info.value.reason == "private_address"
    assert "download.allow_networks" in info.value.detail  # the detail names the key that allows it
    with pytest.raises(Refused):
        policy.check_ip(host)  # the connect-time check (DNS answers) refuses it too


def test_public_ipv4_inside_ipv6_is_allowed():
    policy = UrlPolicy()
    for host in ("64:ff9b::808:808", "2002:808:808::1", "2001:4860:4860::8888", "::ffff:8.8.8.8"):
        policy.check_url(f"http://[{host}]/a.jpg")


# -- a loopback server for the fetch-level checks ---------------------------------------------------------------
class _Hostile(Handler):
    seen_hosts: list = []
    big_sent: list = []
    big_done = threading.Event()
    redirects = {
        "/to-file": "file:///etc/passwd",
        "/to-gopher": "gopher://127.0.0.1:70/1",
        "/to-data": "data:image/png;base64,iVBORw0KGgo=",
        "/to-ftp": "ftp://127.0.0.1/x.jpg",
        "/loop-a": "/loop-b",
        "/loop-b": "/loop-a",
        "/self": "/self",
    }

    def do_GET(self):  # noqa: N802
        type(self).seen_hosts.append(self.headers.get("Host"))
        port = self.server.server_address[1]
        if self.path in self.redirects:
            return self._redirect(self.redirects[self.path])
        if self.path.startswith("/chain/"):
            return self._redirect(f"/chain/{int(self.path.rsplit('/', 1)[1]) + 1}")
        if self.path == "/to-blocked":
            return self._redirect(f"http://local%68ost:{port}/final")
        if self.path.startswith("/big"):
            return self._big(declare=self.path == "/big-declared")
        if self.path.startswith("/dribble"):
            return self._dribble(headers=self.path == "/dribble-headers")
        self.reply(200, b"final")

    def _redirect(self, location):
        self.reply(302, headers={"Location": location})

    big_mib = 64

    def _big(self, declare):
        self.send_response(200)
        if declare:
            self.send_header("Content-Length", str(self.big_mib << 20))
        self.end_headers()
        type(self).big_sent.append(self.send_repeated(b"\0" * (1 << 20), self.big_mib))
        type(self).big_done.set()

    def _dribble(self, headers):
        self.wfile.write(b"HTTP/1.0 200 OK\r\n")
        # 4 s of header bytes, each well inside the client's 2 s socket timeout (stop when the client hangs up)
        if headers and self.send_repeated(b"X", 40, delay=0.1) < 40:
            return
        if self.send_repeated(b"-A: b\r\nContent-Length: 40\r\n\r\n", 1):
            self.send_repeated(b"x", 40, delay=0.1)


@pytest.fixture(scope="module")
def hostile():
    with serve(_Hostile) as server:
        yield server


def _reason_of(opener, url):
    from curation.stages.download import reason_from_error

    try:
        with opener.open(url, timeout=2) as r:
            r.read()
    except Exception as err:  # noqa: BLE001 - what img2dataset does: it keeps str(err)
        return reason_from_error(str(err))[0]
    return None


def test_percent_encoded_blocked_host_is_never_fetched(hostile):
    base, port = hostile
    opener = build_safe_opener(UrlPolicy(allow_networks=["127.0.0.1/32"], blocklist_domains=["localhost"]))
    _Hostile.seen_hosts.clear()
    for url in (f"http://local%68ost:{port}/x", f"http://LOCALHOST.:{port}/x", f"{base}/to-blocked"):
        assert _reason_of(opener, url) == "blocked_domain", url
    assert not any(h and h.lower().startswith("localhost") for h in _Hostile.seen_hosts), _Hostile.seen_hosts


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/to-file", "bad_redirect"),
        ("/to-gopher", "bad_redirect"),
        ("/to-data", "bad_redirect"),
        ("/to-ftp", "bad_redirect"),
        ("/loop-a", "redirect_loop"),
        ("/self", "redirect_loop"),
        ("/chain/0", "too_many_redirects"),
    ],
)
def test_redirect_drop_reasons(hostile, path, reason):
    from curation.stages import drop_reasons

    assert reason in drop_reasons("download")
    opener = build_safe_opener(UrlPolicy(allow_networks=["127.0.0.1/32"]))
    assert _reason_of(opener, f"{hostile[0]}{path}") == reason


def _socket_buffers() -> int:
    """The most a loopback TCP connection can hold in kernel buffers: the receive plus send autotuning maxima."""
    total = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        try:
            total += int(open(f"/proc/sys/net/ipv4/{name}").read().split()[2])
        except (OSError, ValueError, IndexError):
            total += 64 << 20  # not Linux: assume generous buffers
    return total


@pytest.mark.parametrize("declare", [True, False])
def test_body_reading_stops_at_max_bytes(hostile, declare, monkeypatch):
    max_bytes = 1 << 20
    bound = max_bytes + _socket_buffers() + (1 << 20)  # what was read + what the kernel held + one server write
    monkeypatch.setattr(_Hostile, "big_mib", 2 * bound >> 20)
    opener = build_safe_opener(UrlPolicy(allow_networks=["127.0.0.1/32"]), max_bytes=max_bytes)
    _Hostile.big_sent.clear()
    _Hostile.big_done.clear()
    assert _reason_of(opener, f"{hostile[0]}/big-declared" if declare else f"{hostile[0]}/big") == "too_large_file"
    assert _Hostile.big_done.wait(120)
    # the client hung up after max_bytes: the server could not send more than the kernel buffers held on top
    assert _Hostile.big_sent[0] <= bound < _Hostile.big_mib << 20, (_Hostile.big_sent, bound)
    assert opener.open(f"{hostile[0]}/final", timeout=5).read() == b"final"  # small bodies are untouched


@pytest.mark.parametrize("path", ["/dribble-body", "/dribble-headers"])
def test_per_url_deadline_covers_headers_and_body(hostile, path):
    # each byte arrives well within the 2 s socket timeout, so only a wall deadline can stop the 4 s response
    opener = build_safe_opener(UrlPolicy(allow_networks=["127.0.0.1/32"]), deadline_s=1.0)
    assert _reason_of(opener, f"{hostile[0]}{path}") == "timeout"


def test_bounds_hold_over_https(tmp_path, monkeypatch):
    cert = tls_cert(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert[0]))  # urllib's default context trusts the test certificate
    with serve(_Hostile, tls=cert) as (base, _):
        opener = build_safe_opener(UrlPolicy(allow_networks=["127.0.0.1/32"]), max_bytes=1 << 20, deadline_s=1.0)
        assert opener.open(f"{base}/final", timeout=5).read() == b"final"
        assert _reason_of(opener, f"{base}/big") == "too_large_file"
        assert _reason_of(opener, f"{base}/dribble-body") == "timeout"
        assert _reason_of(opener, f"{base}/to-file") == "bad_redirect"
