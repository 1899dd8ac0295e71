"""Download an agent package to `packages/{agentAppId}@{version}@{sha256[:12]}.apkg`.

http(s) URLs (or `{"signedUrl": ...}` objects) are fetched with requests,
only from addresses agents may reach, following at most a few checked
redirects (par.fetch_guard), with a connect timeout and a total time budget,
up to 3 attempts with backoff on connection errors and 5xx answers (a 4xx is
final), and a size cap enforced while streaming.  The body goes to a
temporary file in the same folder, is verified against `packageSha256` when
one is given, and is renamed into place only then: `packages/` never holds
a partial or unverified file.

Kept packages are named by the digest of their bytes (par.layout), so a new
package never replaces one a deployment was started from.  What may be
reused without a download:
- with `packageSha256`: the kept file of that digest (no request at all);
- without it: the file the same URL gave last time, when the server answers
  a conditional GET (its ETag / Last-Modified) with 304.  Any other URL, or a
  server without validators, is downloaded again.
`forceRefresh` always downloads.  `file://` URLs and plain paths are accepted
only from local callers (the CLI on the unix socket); they are copied in
every time, since the source is at hand and may have changed.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import requests
import urllib3

from par import ids, layout
from par.config import Config
from par.errors import ParError
from par.fetch_guard import AddressGuard, next_hop
from par.fsutil import atomic_write_text, fsync_dir
from par.log import event

ATTEMPTS = 3
_CHUNK = 64 * 1024
_FIELD_URL = "packageUrl"
_FIELD_SHA = "packageSha256"


@dataclass(frozen=True)
class FetchResult:
    """A package file ready to extract."""

    path: Path
    sha256: str
    bytes: int
    reused: bool  # no download: the kept file was known good
    seconds: float
    created: bool = False  # this fetch put a new file in packages/


@dataclass(frozen=True)
class Validators:
    """What identifies the bytes an http(s) URL gave (for a conditional GET)."""

    url: str  # redacted: signed URLs change their query every time
    sha256: str
    etag: str | None = None
    last_modified: str | None = None

    def headers(self) -> dict[str, str]:
        out = {}
        if self.etag:
            out["If-None-Match"] = self.etag
        if self.last_modified:
            out["If-Modified-Since"] = self.last_modified
        return out


class _NotModified(Exception):
    """The server says the package is the one fetched last time (304)."""


class _Retry(Exception):
    """A failure worth another attempt (connection error, 5xx, body cut short)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _sources_file(cfg: Config, agent_id: str, version: str) -> Path:
    return layout.package_sources(cfg) / f"{agent_id}@{version}.json"


def _read_validators(cfg: Config, agent_id: str, version: str) -> Validators | None:
    try:
        raw = json.loads(_sources_file(cfg, agent_id, version).read_text())
        return Validators(url=str(raw["url"]), sha256=str(raw["sha256"]),
                          etag=raw.get("etag"), last_modified=raw.get("lastModified"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_validators(cfg: Config, agent_id: str, version: str, v: Validators) -> None:
    path = _sources_file(cfg, agent_id, version)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    atomic_write_text(path, json.dumps({"url": v.url, "sha256": v.sha256, "etag": v.etag,
                                        "lastModified": v.last_modified}) + "\n")


def forget_sources(cfg: Config, agent_id: str, version: str) -> None:
    """Drop the remembered URL of agent@version (its package files are being purged)."""
    _sources_file(cfg, agent_id, version).unlink(missing_ok=True)


def redact_url(url: str) -> str:
    """The URL without query, fragment or credentials (signed URLs carry secrets there)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _url_of(package_url: str | dict) -> str:
    if isinstance(package_url, dict):
        url = package_url.get("signedUrl")
        if not isinstance(url, str) or not url:
            raise ParError("package_url_invalid",
                           "packageUrl: an object must have a non-empty 'signedUrl' string",
                           _FIELD_URL)
        return url
    if not isinstance(package_url, str) or not package_url:
        raise ParError("package_url_invalid",
                       "packageUrl: expected a URL string or {\"signedUrl\": ...}", _FIELD_URL)
    return package_url


def _local_source(url: str) -> Path | None:
    """The path a `file://` URL or a plain path names; None for other URLs."""
    if url.startswith("file:"):
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ParError("package_url_invalid",
                           "packageUrl: a file:// URL must name a local path", _FIELD_URL)
        return Path(urllib.parse.unquote(parts.path))
    if "://" not in url:
        return Path(url)
    return None


def _check_sha(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    if not isinstance(sha256, str) or not ids.SHA256_RE.fullmatch(sha256.lower()):
        raise ParError("package_sha_invalid",
                       "packageSha256: expected 64 hexadecimal digits", _FIELD_SHA)
    return sha256.lower()


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _timeout(timeout_s: float) -> ParError:
    return ParError("package_download_timeout",
                    f"the download took longer than {timeout_s:g} s "
                    "(limits.download_timeout_s)", _FIELD_URL, 504)


def _too_large(cap: int) -> ParError:
    return ParError("package_too_large",
                    f"the package is larger than the limit of {cap} bytes "
                    "(limits.max_package_bytes)", _FIELD_URL, 413)


def _write_stream(chunks: Iterator[bytes], out: BinaryIO, cap: int) -> tuple[int, str]:
    """Copy `chunks` to `out` under the size cap; return (bytes, sha256)."""
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > cap:
            raise _too_large(cap)
        digest.update(chunk)
        out.write(chunk)
    return size, digest.hexdigest()


def _body_chunks(resp: requests.Response, deadline: float, timeout_s: float) -> Iterator[bytes]:
    """The response body as it arrives, stopping at the deadline.

    `iter_content` waits for a whole chunk, so a server sending a byte at a
    time would never be cut off; `read1` returns whatever one read brings.
    """
    raw = resp.raw
    encoded = resp.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
    fp = getattr(raw, "_fp", None)  # urllib3 1.x: the http.client response
    read1 = getattr(raw, "read1", None) or getattr(fp, "read1", None)
    if encoded or read1 is None:
        reader: Callable[[], bytes] = lambda: raw.read(_CHUNK, decode_content=True)  # noqa: E731
    else:
        reader = lambda: read1(_CHUNK)  # noqa: E731
    while True:
        if time.monotonic() > deadline:
            raise _timeout(timeout_s)
        try:
            chunk = reader()
        except (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError,
                TimeoutError) as exc:
            raise _timeout(timeout_s) from exc
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError,
                http.client.HTTPException, OSError, ValueError) as exc:
            raise _Retry(f"the connection broke during the download ({type(exc).__name__})") \
                from exc
        if not chunk:
            return
        yield chunk


def _get(session: requests.Session, url: str, cfg: Config, remaining: float,
         conditional: dict[str, str]) -> requests.Response:
    """One GET of `url` (no redirect followed); raise _Retry or ParError."""
    limits = cfg.limits
    try:
        return session.get(
            url, stream=True, allow_redirects=False,
            # The read timeout bounds each wait for data; the deadline bounds the whole.
            timeout=(min(limits.download_connect_timeout_s, remaining), remaining),
            headers={"Accept-Encoding": "identity", **conditional},
        )
    except requests.exceptions.ConnectTimeout as exc:
        raise _Retry(f"connection timed out ({type(exc).__name__})") from exc
    except requests.exceptions.ReadTimeout as exc:
        raise ParError("package_download_timeout",
                       f"the server did not answer within {limits.download_timeout_s:g} s",
                       _FIELD_URL, 504) from exc
    except requests.exceptions.SSLError as exc:
        # A certificate problem does not go away by asking again.
        raise ParError("package_download_failed", f"TLS error: {exc}", _FIELD_URL, 502) from exc
    except requests.exceptions.ConnectionError as exc:
        raise _Retry(f"cannot connect to the server ({type(exc).__name__})") from exc
    except requests.exceptions.RequestException as exc:
        raise ParError("package_download_failed", f"cannot download the package: {exc}",
                       _FIELD_URL, 502) from exc


def _follow(guard: AddressGuard, session: requests.Session, url: str, cfg: Config,
            deadline: float, conditional: dict[str, str]) -> requests.Response:
    """The answer at the end of `url`'s redirects, each hop checked by `guard`."""
    hops = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout(cfg.limits.download_timeout_s)
        guard.check_proxied(url)
        resp = _get(session, url, cfg, remaining, conditional)
        try:
            target = next_hop(url, resp, hops)
        except BaseException:
            resp.close()
            raise
        if target is None:
            return resp
        resp.close()
        url, hops = target, hops + 1


def _attempt(url: str, out: BinaryIO, cfg: Config, deadline: float,
             conditional: dict[str, str]) -> tuple[int, str, dict[str, str]]:
    """One GET (and its redirects) into `out`; return (bytes, sha256, the answer's
    validators); raise _NotModified (304 to `conditional`), _Retry or ParError."""
    limits = cfg.limits
    guard = AddressGuard.for_config(cfg)
    with guard.session() as session, _follow(guard, session, url, cfg, deadline,
                                             conditional) as resp:
        if resp.status_code == 304 and conditional:
            raise _NotModified()
        if resp.status_code >= 500:
            raise _Retry(f"the server answered {resp.status_code}")
        if resp.status_code != 200:
            raise ParError("package_download_failed",
                           f"the server answered {resp.status_code} {resp.reason or ''}".strip(),
                           _FIELD_URL, 502)
        cap = limits.max_package_bytes
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise _too_large(cap)
        size, digest = _write_stream(
            _body_chunks(resp, deadline, limits.download_timeout_s), out, cap)
        if declared and declared.isdigit() and size != int(declared):
            raise _Retry(f"the body ended after {size} of {declared} bytes")
        validators = {k: resp.headers[h] for k, h in (("etag", "ETag"),
                                                     ("last_modified", "Last-Modified"))
                      if resp.headers.get(h)}
        return size, digest, validators


def _download(url: str, tmp: Path, cfg: Config, logger: logging.Logger | None,
              backoff_s: float, conditional: dict[str, str]) -> tuple[int, str, dict[str, str]]:
    deadline = time.monotonic() + cfg.limits.download_timeout_s
    last = ""
    attempt = 0
    while attempt < ATTEMPTS:
        attempt += 1
        with open(tmp, "wb") as out:
            try:
                size, digest, validators = _attempt(url, out, cfg, deadline, conditional)
                out.flush()
                os.fsync(out.fileno())
                return size, digest, validators
            except _Retry as exc:
                last = exc.reason
        if logger is not None:
            event(logger, "Package download failed", logging.WARNING,
                  url=redact_url(url), attempt=attempt, reason=last)
        if attempt < ATTEMPTS:
            pause = backoff_s * 2 ** (attempt - 1)
            if time.monotonic() + pause > deadline:
                break
            time.sleep(pause)
    tries = f"{attempt} attempts" if attempt > 1 else "1 attempt"
    raise ParError("package_download_failed",
                   f"cannot download the package after {tries}: {last}", _FIELD_URL, 502)


def _copy_local(src: Path, tmp: Path, cfg: Config) -> tuple[int, str]:
    if not src.is_absolute():
        raise ParError("package_url_invalid",
                       f"packageUrl: local path {str(src)!r} must be absolute", _FIELD_URL)
    try:
        with open(src, "rb") as fh, open(tmp, "wb") as out:
            size, digest = _write_stream(iter(lambda: fh.read(_CHUNK), b""), out,
                                         cfg.limits.max_package_bytes)
            out.flush()
            os.fsync(out.fileno())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ParError("package_not_found", f"packageUrl: no package file at {src}",
                       _FIELD_URL, 404) from None
    except PermissionError:
        raise ParError("package_not_found", f"packageUrl: cannot read {src}",
                       _FIELD_URL, 403) from None
    return size, digest


def fetch_package(cfg: Config, agent_id: str, version: str, package_url: str | dict,
                  sha256: str | None, force_refresh: bool,
                  logger: logging.Logger | None, backoff_s: float = 1.0) -> FetchResult:
    """Make `packages/` hold the requested package of `agent_id` at `version`.

    `file://` URLs and plain paths are read from the local disk: only the unix
    socket accepts them (par.deploy_request refuses them over TCP).  `backoff_s`
    is the pause before the 2nd attempt (doubled before the 3rd).  Raises ParError
    naming `packageUrl` or `packageSha256`; on failure no file in `packages/` was added or removed.
    """
    started = time.monotonic()
    ids.agent_id(agent_id)
    ids.version(version)
    expected = _check_sha(sha256)
    url = _url_of(package_url)
    local = _local_source(url)
    if local is None and urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
        raise ParError("package_url_invalid",
                       "packageUrl: expected an http(s) URL", _FIELD_URL)
    folder = layout.packages(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    source = str(local) if local is not None else redact_url(url)

    def reuse(path: Path, digest: str) -> FetchResult:
        if logger is not None:
            event(logger, "Reusing cached package", path=str(path), sha256=digest,
                  agentAppId=agent_id, version=version)
        return FetchResult(path, digest, path.stat().st_size, True,
                           round(time.monotonic() - started, 3))

    conditional: dict[str, str] = {}
    known = None
    if local is None and not force_refresh:
        if expected is not None:
            kept = layout.package_file(cfg, agent_id, version, expected)
            if kept.is_file() and file_sha256(kept) == expected:
                return reuse(kept, expected)
        else:
            known = _read_validators(cfg, agent_id, version)
            if known is not None and known.url == source and \
                    layout.package_file(cfg, agent_id, version, known.sha256).is_file():
                conditional = known.headers()

    if logger is not None:
        event(logger, "Downloading package", url=source, agentAppId=agent_id, version=version,
              conditional=bool(conditional))
    # '~' cannot occur in ids or versions: the temp name never looks like a package.
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{agent_id}@{version}~",
                                    suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        validators: dict[str, str] = {}
        if local is not None:
            size, digest = _copy_local(local, tmp, cfg)
        else:
            try:
                size, digest, validators = _download(url, tmp, cfg, logger, backoff_s,
                                                     conditional)
            except _NotModified:
                assert known is not None
                tmp.unlink()
                return reuse(layout.package_file(cfg, agent_id, version, known.sha256),
                             known.sha256)
        if expected is not None and digest != expected:
            raise ParError("package_sha_mismatch",
                           f"the package's SHA-256 is {digest}, but packageSha256 "
                           f"says {expected}", _FIELD_SHA)
        dest = layout.package_file(cfg, agent_id, version, digest)
        created = not dest.is_file()
        if created:
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
            fsync_dir(folder)
        else:
            tmp.unlink()  # the same bytes are kept already
        if local is None:
            _write_validators(cfg, agent_id, version, Validators(
                source, digest, validators.get("etag"), validators.get("last_modified")))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    seconds = round(time.monotonic() - started, 3)
    if logger is not None:
        event(logger, "Package downloaded", url=source, path=str(dest), bytes=size,
              sha256=digest, seconds=seconds)
    return FetchResult(dest, digest, size, False, seconds, created)


def cleanup_stale(cfg: Config) -> list[str]:
    """Remove partial downloads a killed pard left behind (called once at start)."""
    removed = []
    folder = layout.packages(cfg)
    if folder.is_dir():
        for path in folder.glob(".*~*.part"):
            path.unlink(missing_ok=True)
            removed.append(str(path))
    return removed
