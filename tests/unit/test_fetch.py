"""fetch_package against a real HTTP server on 127.0.0.1 (stdlib, in a thread)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import socket
import stat
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from par import layout
from par.errors import ParError
from par.fetch import fetch_package, forget_sources, redact_url
from par.fetch_guard import AddressGuard, next_hop
from par.log import JsonFormatter
from tests.unit.apkg_factory import make_cfg, tree

BODY = bytes(range(256)) * 400  # 100 KiB
BODY_SHA = hashlib.sha256(BODY).hexdigest()
OTHER = b"another package"
OTHER_SHA = hashlib.sha256(OTHER).hexdigest()
BODY_FILE = f"demo@1.0.0@{BODY_SHA[:12]}.apkg"
SOURCES = ".sources/demo@1.0.0.json"
FAST = 0.01  # retry backoff in tests


class Server:
    """Answers by path; counts requests per path."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.hits: Counter[str] = Counter()
        self.body = BODY
        self.conditional: list[str | None] = []  # If-None-Match of each /tagged request
        self.redirects: dict[str, str] = {}  # path -> Location of a 302
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?")[0]
                outer.hits[path] += 1
                if path in outer.redirects:
                    self.send_response(302)
                    self.send_header("Location", outer.redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                getattr(outer, "route_" + path.strip("/").replace("-", "_"),
                        outer.route_missing)(self, outer.hits[path])

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, body: bytes, length: int | None = None,
             close: bool = False) -> None:
        h.send_response(status)
        h.send_header("Content-Length", str(len(body) if length is None else length))
        if close:
            h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()

    def route_ok(self, h: BaseHTTPRequestHandler, n: int) -> None:
        self.send(h, 200, self.body)

    def route_tagged(self, h: BaseHTTPRequestHandler, n: int) -> None:
        """An ETag (the body's digest) and a 304 to a request that already has it."""
        self.conditional.append(h.headers.get("If-None-Match"))
        tag = f'"{hashlib.sha256(self.body).hexdigest()[:16]}"'
        if h.headers.get("If-None-Match") == tag:
            h.send_response(304)
            h.send_header("ETag", tag)
            h.end_headers()
            return
        h.send_response(200)
        h.send_header("ETag", tag)
        h.send_header("Content-Length", str(len(self.body)))
        h.end_headers()
        h.wfile.write(self.body)

    def route_missing(self, h: BaseHTTPRequestHandler, n: int) -> None:
        self.send(h, 404, b"not here")

    def route_flaky(self, h: BaseHTTPRequestHandler, n: int) -> None:
        if n == 1:
            self.send(h, 503, b"busy")
        else:
            self.send(h, 200, self.body)

    def route_down(self, h: BaseHTTPRequestHandler, n: int) -> None:
        self.send(h, 500, b"broken")

    def route_stall(self, h: BaseHTTPRequestHandler, n: int) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(BODY)))
        h.end_headers()
        h.wfile.write(BODY[:1000])
        h.wfile.flush()
        time.sleep(3)

    def route_drip(self, h: BaseHTTPRequestHandler, n: int) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(BODY)))
        h.end_headers()
        try:
            for i in range(60):  # a byte every 50 ms: never idle, never done
                h.wfile.write(BODY[i:i + 1])
                h.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass

    def route_big(self, h: BaseHTTPRequestHandler, n: int) -> None:
        self.send(h, 200, BODY)

    def route_big_chunked(self, h: BaseHTTPRequestHandler, n: int) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        try:
            for _ in range(20):
                chunk = BODY[:10_000]
                h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass

    def route_short(self, h: BaseHTTPRequestHandler, n: int) -> None:
        self.send(h, 200, BODY[:500], length=len(BODY), close=True)
        h.close_connection = True

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.close()


def fetch(cfg, url, sha=None, force=False, logger=None, version="1.0.0"):
    return fetch_package(cfg, "demo", version, url, sha, force, logger, backoff_s=FAST)


def refused(cfg, url, code: str, field: str = "packageUrl", **kw) -> ParError:
    with pytest.raises(ParError) as info:
        fetch(cfg, url, **kw)
    assert (info.value.code, info.value.field) == (code, field), info.value
    assert tree(layout.packages(cfg)) == []  # no partial or temp file
    return info.value


def refused_keeping(cfg, url, code: str, field: str = "packageUrl", **kw) -> ParError:
    """Like `refused`, where packages/ held files before: they are all still there."""
    before = {p: p.read_bytes() for p in layout.packages(cfg).rglob("*") if p.is_file()}
    with pytest.raises(ParError) as info:
        fetch(cfg, url, **kw)
    assert (info.value.code, info.value.field) == (code, field), info.value
    assert {p: p.read_bytes() for p in layout.packages(cfg).rglob("*") if p.is_file()} == before
    return info.value


def test_download_200(tmp_path: Path, server: Server) -> None:
    cfg = make_cfg(tmp_path)
    res = fetch(cfg, server.url + "/ok", sha=BODY_SHA)
    assert res.path == layout.packages(cfg) / BODY_FILE
    assert (res.sha256, res.bytes, res.reused, res.created) == (BODY_SHA, len(BODY), False, True)
    assert res.seconds >= 0
    assert res.path.read_bytes() == BODY
    assert stat.S_IMODE(res.path.stat().st_mode) == 0o644
    assert tree(layout.packages(cfg)) == [".sources", SOURCES, BODY_FILE]


def test_uppercase_sha_is_accepted(tmp_path: Path, server: Server) -> None:
    assert fetch(make_cfg(tmp_path), server.url + "/ok", sha=BODY_SHA.upper()).sha256 == BODY_SHA


def test_404_is_not_retried(tmp_path: Path, server: Server) -> None:
    err = refused(make_cfg(tmp_path), server.url + "/missing", "package_download_failed")
    assert "404" in err.message and err.status == 502
    assert server.hits["/missing"] == 1


def test_503_then_200_is_retried(tmp_path: Path, server: Server) -> None:
    res = fetch(make_cfg(tmp_path), server.url + "/flaky", sha=BODY_SHA)
    assert res.sha256 == BODY_SHA
    assert server.hits["/flaky"] == 2


def test_5xx_gives_up_after_three_attempts(tmp_path: Path, server: Server) -> None:
    err = refused(make_cfg(tmp_path), server.url + "/down", "package_download_failed")
    assert "3 attempts" in err.message and "500" in err.message
    assert server.hits["/down"] == 3


def test_connection_refused_is_retried(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    err = refused(make_cfg(tmp_path), f"http://127.0.0.1:{port}/x.apkg", "package_download_failed")
    assert "3 attempts" in err.message


def test_body_cut_short_is_retried_then_fails(tmp_path: Path, server: Server) -> None:
    refused(make_cfg(tmp_path), server.url + "/short", "package_download_failed")
    assert server.hits["/short"] == 3


def test_stalled_body_hits_the_timeout(tmp_path: Path, server: Server) -> None:
    cfg = make_cfg(tmp_path, download_timeout_s=0.5)
    started = time.monotonic()
    err = refused(cfg, server.url + "/stall", "package_download_timeout")
    assert time.monotonic() - started < 2.5
    assert err.status == 504
    assert server.hits["/stall"] == 1


def test_dripping_body_hits_the_total_timeout(tmp_path: Path, server: Server) -> None:
    cfg = make_cfg(tmp_path, download_timeout_s=0.6)
    started = time.monotonic()
    refused(cfg, server.url + "/drip", "package_download_timeout")
    assert time.monotonic() - started < 2.0


def test_declared_body_past_the_cap(tmp_path: Path, server: Server) -> None:
    cfg = make_cfg(tmp_path, max_package_bytes=50_000)
    err = refused(cfg, server.url + "/big", "package_too_large")
    assert "50000" in err.message and err.status == 413
    assert server.hits["/big"] == 1


def test_streamed_body_past_the_cap(tmp_path: Path, server: Server) -> None:
    cfg = make_cfg(tmp_path, max_package_bytes=50_000)
    refused(cfg, server.url + "/big-chunked", "package_too_large")
    assert server.hits["/big-chunked"] == 1


def test_sha_mismatch_names_both_digests(tmp_path: Path, server: Server) -> None:
    err = refused(make_cfg(tmp_path), server.url + "/ok", "package_sha_mismatch",
                  "packageSha256", sha=OTHER_SHA)
    assert BODY_SHA in err.message and OTHER_SHA in err.message


def test_cached_file_is_reused_without_a_request_when_its_sha_is_given(
        tmp_path: Path, server: Server) -> None:
    cfg = make_cfg(tmp_path)
    first = fetch(cfg, server.url + "/ok", sha=BODY_SHA)
    again = fetch(cfg, server.url + "/ok", sha=BODY_SHA)
    assert again.reused and not again.created
    assert again.path == first.path and again.sha256 == BODY_SHA and again.bytes == len(BODY)
    assert server.hits["/ok"] == 1


def test_without_a_sha_the_url_is_asked_again(tmp_path: Path, server: Server) -> None:
    # A server without validators: the bytes are downloaded again and compared.
    cfg = make_cfg(tmp_path)
    first = fetch(cfg, server.url + "/ok")
    same = fetch(cfg, server.url + "/ok")
    assert (same.path, same.reused, same.created) == (first.path, False, False)
    server.body = OTHER  # republished under the same version
    other = fetch(cfg, server.url + "/ok")
    assert other.sha256 == OTHER_SHA and other.path != first.path and other.created
    assert first.path.read_bytes() == BODY  # the earlier package is still there, unchanged
    assert server.hits["/ok"] == 3


def test_a_new_url_for_a_cached_version_is_fetched(tmp_path: Path, server: Server) -> None:
    # A republished package never hides behind the cached one: a 404 is a 404.
    cfg = make_cfg(tmp_path)
    fetch(cfg, server.url + "/ok")
    err = refused_keeping(cfg, server.url + "/missing", "package_download_failed")
    assert "404" in err.message and server.hits["/missing"] == 1


def test_conditional_get_with_the_etag(tmp_path: Path, server: Server) -> None:
    cfg = make_cfg(tmp_path)
    first = fetch(cfg, server.url + "/tagged")
    again = fetch(cfg, server.url + "/tagged")
    assert again.reused and again.path == first.path
    server.body = OTHER
    changed = fetch(cfg, server.url + "/tagged")
    assert changed.sha256 == OTHER_SHA and not changed.reused
    tag = f'"{BODY_SHA[:16]}"'
    assert server.conditional == [None, tag, tag]
    forced = fetch(cfg, server.url + "/tagged", force=True)  # no validators sent
    assert forced.sha256 == OTHER_SHA and server.conditional[-1] is None


def test_sha_mismatch_keeps_the_package_already_there(tmp_path: Path, server: Server) -> None:
    cfg = make_cfg(tmp_path)
    fetch(cfg, server.url + "/ok", sha=BODY_SHA)
    refused_keeping(cfg, server.url + "/ok", "package_sha_mismatch", "packageSha256",
                    sha=OTHER_SHA)
    assert (layout.packages(cfg) / BODY_FILE).read_bytes() == BODY


def test_cached_file_with_another_sha_is_downloaded_again(tmp_path: Path, server: Server) -> None:
    cfg = make_cfg(tmp_path)
    fetch(cfg, server.url + "/ok", sha=BODY_SHA)
    server.body = OTHER
    res = fetch(cfg, server.url + "/ok", sha=OTHER_SHA)
    assert (res.reused, res.sha256) == (False, OTHER_SHA)
    assert res.path.read_bytes() == OTHER
    assert server.hits["/ok"] == 2


def test_force_refresh_downloads_again(tmp_path: Path, server: Server) -> None:
    cfg = make_cfg(tmp_path)
    fetch(cfg, server.url + "/ok")
    server.body = OTHER
    res = fetch(cfg, server.url + "/ok", force=True)
    assert (res.reused, res.sha256) == (False, OTHER_SHA)
    assert server.hits["/ok"] == 2


def test_failed_refresh_keeps_nothing_half_written(tmp_path: Path, server: Server) -> None:
    cfg = make_cfg(tmp_path)
    fetch(cfg, server.url + "/ok")
    with pytest.raises(ParError):
        fetch(cfg, server.url + "/down", force=True)
    assert tree(layout.packages(cfg)) == [".sources", SOURCES, BODY_FILE]
    assert (layout.packages(cfg) / BODY_FILE).read_bytes() == BODY


def test_signed_url_object(tmp_path: Path, server: Server) -> None:
    res = fetch(make_cfg(tmp_path), {"signedUrl": server.url + "/ok?X-Amz-Signature=s3cr3t"})
    assert res.sha256 == BODY_SHA


@pytest.mark.parametrize("url", [{"url": "http://x"}, {"signedUrl": ""}, "", 42,
                                 "ftp://example.com/a.apkg", "file://otherhost/a.apkg"])
def test_bad_package_urls(tmp_path: Path, url: object) -> None:
    refused(make_cfg(tmp_path), url, "package_url_invalid")


def test_bad_sha(tmp_path: Path, server: Server) -> None:
    refused(make_cfg(tmp_path), server.url + "/ok", "package_sha_invalid", "packageSha256",
            sha="abc")
    assert server.hits["/ok"] == 0


def test_local_files(tmp_path: Path) -> None:
    # only the unix socket accepts them: par.deploy_request refuses them over TCP
    src = tmp_path / "my.apkg"
    src.write_bytes(BODY)
    cfg = make_cfg(tmp_path)
    res = fetch(cfg, f"file://{src}", sha=BODY_SHA)
    assert (res.sha256, res.reused) == (BODY_SHA, False)
    src.write_bytes(OTHER)  # a local source is copied again every time
    res = fetch(cfg, str(src))
    assert res.path.read_bytes() == OTHER and not res.reused


def test_local_file_errors(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    refused(cfg, str(tmp_path / "nope.apkg"), "package_not_found")
    refused(cfg, "relative/x.apkg", "package_url_invalid")
    big = tmp_path / "big.apkg"
    big.write_bytes(BODY)
    refused(make_cfg(tmp_path, max_package_bytes=1000), str(big), "package_too_large")


def test_bad_ids_are_refused(tmp_path: Path, server: Server) -> None:
    with pytest.raises(ParError) as info:
        fetch(make_cfg(tmp_path), server.url + "/ok", version="../../x")
    assert (info.value.code, info.value.field) == ("invalid_id", "version")
    assert server.hits["/ok"] == 0


def test_logs_never_show_the_signed_query(tmp_path: Path, server: Server) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.fetch.redact")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fetch(make_cfg(tmp_path), {"signedUrl": server.url + "/flaky?sig=s3cr3t"}, logger=logger)
    logged = stream.getvalue()
    assert "Downloading package" in logged and "Package downloaded" in logged
    assert "Package download failed" in logged  # the first 503
    assert "s3cr3t" not in logged
    assert redact_url("https://u:p@h.example:8443/a/b.apkg?sig=x#f") == \
        "https://h.example:8443/a/b.apkg"


def test_forget_sources(tmp_path: Path, server: Server) -> None:
    cfg = make_cfg(tmp_path)
    fetch(cfg, server.url + "/tagged")
    forget_sources(cfg, "demo", "1.0.0")
    forget_sources(cfg, "demo", "1.0.0")  # already gone: fine
    assert tree(layout.packages(cfg)) == [".sources", BODY_FILE]
    fetch(cfg, server.url + "/tagged")  # nothing remembered: no conditional request
    assert server.conditional == [None, None]


# ---------------------------------------------------------------- where a download may go

def denying(cfg, *networks: str):
    """`cfg` whose agents (and so package downloads) may not reach `networks`."""
    return dataclasses.replace(cfg, agents=dataclasses.replace(cfg.agents,
                                                               ip_address_deny=list(networks)))


@pytest.fixture()
def other_server() -> Iterator[Server]:
    """A server on 127.0.0.2: another address of this host, denied in these tests."""
    srv = Server("127.0.0.2")
    yield srv
    srv.close()


def test_redirects_are_followed(tmp_path: Path, server: Server) -> None:
    server.redirects = {"/a": "/b", "/b": server.url + "/ok"}
    got = fetch(make_cfg(tmp_path), server.url + "/a")
    assert got.path.read_bytes() == BODY
    assert (server.hits["/a"], server.hits["/b"], server.hits["/ok"]) == (1, 1, 1)


def test_redirect_loops_end(tmp_path: Path, server: Server) -> None:
    server.redirects = {"/loop": "/loop"}
    err = refused(make_cfg(tmp_path), server.url + "/loop", "package_download_failed")
    assert "more than 5 redirects" in err.message
    assert server.hits["/loop"] == 6


def test_a_redirect_to_a_file_url_is_not_followed(tmp_path: Path, server: Server) -> None:
    server.redirects = {"/x": "file:///etc/passwd"}
    err = refused(make_cfg(tmp_path), server.url + "/x", "package_download_failed")
    assert "only http(s) is followed" in err.message


def test_a_denied_address_is_refused_before_any_connection(
        tmp_path: Path, other_server: Server) -> None:
    cfg = denying(make_cfg(tmp_path), "127.0.0.2/32")
    listening = refused(cfg, other_server.url + "/ok", "package_url_forbidden")
    # The same answer whether or not anything listens there: no oracle.
    port = other_server.httpd.server_address[1]
    other_server.close()
    silent = refused(cfg, f"http://127.0.0.2:{port}/ok", "package_url_forbidden")
    assert listening.message == silent.message
    assert listening.status == 403 and "agents.ip_address_deny" in listening.message
    assert other_server.hits["/ok"] == 0


def test_a_redirect_to_a_denied_address_is_refused(
        tmp_path: Path, server: Server, other_server: Server) -> None:
    server.redirects = {"/go": other_server.url + "/ok"}
    cfg = denying(make_cfg(tmp_path), "127.0.0.2/32")
    refused(cfg, server.url + "/go", "package_url_forbidden")
    assert server.hits["/go"] == 1 and other_server.hits["/ok"] == 0


def test_a_name_is_checked_by_what_it_resolves_to(tmp_path: Path, server: Server) -> None:
    port = server.httpd.server_address[1]
    cfg = denying(make_cfg(tmp_path), "127.0.0.0/8", "::1/128")
    err = refused(cfg, f"http://localhost:{port}/ok", "package_url_forbidden")
    assert "localhost is" in err.message
    assert server.hits["/ok"] == 0


def test_the_default_denies_the_metadata_service(tmp_path: Path) -> None:
    err = refused(make_cfg(tmp_path), "http://169.254.169.254/latest/meta-data/",
                  "package_url_forbidden")
    assert "169.254.169.254" in err.message


@pytest.mark.parametrize("address", ["169.254.169.254", "::ffff:169.254.169.254",
                                     "fd00:ec2::254", "fe80::1%eth0"])
def test_guard_denies(address: str) -> None:
    guard = AddressGuard.from_networks(["169.254.169.254/32", "fd00:ec2::254/128", "fe80::/10"])
    assert guard.denies(address)
    assert not guard.denies("127.0.0.1") and not guard.denies("::1")


def test_with_isolated_loopback_downloads_reach_only_allowed_loopback(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    cfg = dataclasses.replace(cfg, agents=dataclasses.replace(
        cfg.agents, isolate_loopback=True, loopback_allow=["127.0.0.9/32"]))
    guard = AddressGuard.for_config(cfg)
    assert guard.denies("127.0.0.1") and guard.denies("::1") and guard.denies("127.31.164.1")
    assert guard.denies("169.254.169.254")
    assert not guard.denies("127.0.0.9") and not guard.denies("10.0.0.1")
    assert not AddressGuard.for_config(make_cfg(tmp_path)).denies("127.0.0.1")


def test_https_to_http_redirect_is_not_followed() -> None:
    resp = requests.Response()
    resp.status_code = 302
    resp.headers["Location"] = "http://example.org/p.apkg"
    with pytest.raises(ParError, match="from https to plain http"):
        next_hop("https://example.org/start", resp, 0)
    assert next_hop("http://example.org/start", resp, 0) == "http://example.org/p.apkg"
    resp.status_code = 200
    assert next_hop("http://example.org/start", resp, 0) is None
