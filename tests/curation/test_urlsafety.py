"""The address policy refuses private, loopback, link-local and metadata targets before any packet is sent."""

import http.server
import threading
import urllib.error
import urllib.request

import pytest

from curation.urlsafety import Refused, UrlPolicy, build_safe_opener


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


class _Redirect(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        targets = {"/meta": "http://169.254.169.254/latest/meta-data/", "/ten": "http://10.0.0.7/x.jpg",
                   "/blocked": "http://blocked.example/x.jpg", "/ok": "/final"}
        if self.path in targets:
            self.send_response(302)
            self.send_header("Location", targets[self.path])
            self.end_headers()
        else:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"final")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_redirect_targets_are_checked(server):
    opener = build_safe_opener(UrlPolicy(allow_networks=["127.0.0.1/32"], blocklist_domains=["blocked.example"]))
    assert opener.open(f"{server}/ok", timeout=5).read() == b"final"
    for path, reason in (("/meta", "private_address"), ("/ten", "private_address"), ("/blocked", "blocked_domain")):
        with pytest.raises(Refused) as info:
            opener.open(f"{server}{path}", timeout=5)
        assert info.value.reason == reason


def test_hostnames_are_checked_after_resolution(server):
    port = server.rsplit(":", 1)[1]
    opener = build_safe_opener(UrlPolicy())  # loopback not allowed
    with pytest.raises(urllib.error.URLError) as info:
        opener.open(f"http://localhost:{port}/ok", timeout=5)
    assert "lvd:private_address" in str(info.value)
