"""Where a `packageUrl` download may connect, and how its redirects are followed.

pard downloads packages as root, outside every agent's sandbox, so a URL given
to the API must not reach what an agent may not reach: the networks of
`agents.ip_address_deny` (cloud metadata services by default) and, with
`agents.isolate_loopback`, loopback but `agents.loopback_allow`.  Without this a
token holder could make pard fetch instance credentials, and read from the
deploy's error whether an address answers (an oracle).

- The host of every hop is resolved once and each address is checked *before*
  any connection; the connection then goes to the address that was checked, so
  a name that resolves differently a moment later (DNS rebinding) changes
  nothing.
- Redirects are followed by this module, not by requests: at most
  `MAX_REDIRECTS`, http(s) only, never from https down to http, and each
  target is checked like the first URL.
- Through an HTTP(S) proxy (from par.service's environment) the connection goes
  to the proxy, so the target's own name is resolved and checked instead.

What a permitted address answers (401, 404, refused) is still reported: the
caller may deploy an agent that learns the same, and operators need it.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import requests
import requests.adapters
import requests.utils
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from par.config import Config
from par.errors import ParError
from par.loopback import LOOPBACK_NETWORKS

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
_FIELD = "packageUrl"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AddressGuard:
    """The networks a package download may not connect to (`allowed` wins, as
    IPAddressAllow= does over IPAddressDeny=)."""

    denied: tuple[Network, ...]
    allowed: tuple[Network, ...] = ()

    @classmethod
    def from_networks(cls, denied: Iterable[str], allowed: Iterable[str] = ()) -> AddressGuard:
        """A guard denying `denied` but `allowed` (CIDR strings)."""
        return cls(tuple(ipaddress.ip_network(n, strict=False) for n in denied),
                   tuple(ipaddress.ip_network(n, strict=False) for n in allowed))

    @classmethod
    def for_config(cls, cfg: Config) -> AddressGuard:
        """What agents may not reach: `agents.ip_address_deny`, and with
        `agents.isolate_loopback` all of loopback but `agents.loopback_allow`."""
        denied = list(cfg.agents.ip_address_deny)
        allowed: list[str] = []
        if cfg.agents.isolate_loopback:
            denied += LOOPBACK_NETWORKS
            allowed = list(cfg.agents.loopback_allow)
        return cls.from_networks(denied, allowed)

    def denies(self, address: str) -> bool:
        """True if `address` (an IP literal, maybe with a %scope) is in a denied network."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254

        def within(nets: tuple[Network, ...]) -> bool:
            return any(ip.version == net.version and ip in net for net in nets)

        return within(self.denied) and not within(self.allowed)

    def resolve(self, host: str, port: int) -> list[str]:
        """The addresses `host` resolves to, all of them permitted; else ParError."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise ParError("package_download_failed",
                           f"cannot resolve the host {host!r} ({exc})", _FIELD, 502) from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for address in addresses:
            if self.denies(address):
                raise ParError(
                    "package_url_forbidden",
                    f"packageUrl: {host} is {address}, an address agents may not reach "
                    "(agents.ip_address_deny, agents.isolate_loopback); pard does not "
                    "download from it", _FIELD, 403)
        return addresses

    def session(self) -> requests.Session:
        """A requests session whose direct connections go only to permitted addresses."""
        session = requests.Session()
        adapter = _GuardedAdapter(self)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    def check_proxied(self, url: str) -> None:
        """When `url` goes through a proxy, check its host here (the proxy connects to it)."""
        if requests.utils.get_environ_proxies(url):
            parts = urllib.parse.urlsplit(url)
            self.resolve(parts.hostname or "", parts.port or _default_port(parts.scheme))


def next_hop(url: str, resp: requests.Response, hops: int) -> str | None:
    """The URL a redirect answer points to (checked), or None if `resp` is no redirect."""
    if resp.status_code not in REDIRECTS:
        return None
    location = resp.headers.get("Location")
    if not location:
        return None
    if hops >= MAX_REDIRECTS:
        raise ParError("package_download_failed",
                       f"more than {MAX_REDIRECTS} redirects", _FIELD, 502)
    target = urllib.parse.urljoin(url, location)
    scheme = urllib.parse.urlsplit(target).scheme.lower()
    if scheme not in ("http", "https"):
        raise ParError("package_download_failed",
                       f"the server redirected to a {scheme or 'relative'}: URL; "
                       "only http(s) is followed", _FIELD, 502)
    if scheme == "http" and urllib.parse.urlsplit(url).scheme.lower() == "https":
        raise ParError("package_download_failed",
                       "the server redirected from https to plain http; not followed",
                       _FIELD, 502)
    return target


def _default_port(scheme: str) -> int:
    return 443 if scheme.lower() == "https" else 80


def _guarded_new_conn(conn: Any, guard: AddressGuard,
                      base: type[HTTPConnection]) -> socket.socket:
    """Resolve and check the host, then connect to the first checked address."""
    addresses = guard.resolve(conn._dns_host, conn.port)
    name = conn._dns_host
    conn._dns_host = addresses[0]  # no second lookup between the check and the connect
    try:
        return base._new_conn(conn)
    finally:
        conn._dns_host = name


def _pool_classes(guard: AddressGuard) -> dict[str, type]:
    """Connection pool classes whose connections go through `guard`."""

    class GuardedHTTPConnection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return _guarded_new_conn(self, guard, HTTPConnection)

    class GuardedHTTPSConnection(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            return _guarded_new_conn(self, guard, HTTPSConnection)

    class GuardedHTTPPool(HTTPConnectionPool):
        ConnectionCls = GuardedHTTPConnection

    class GuardedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = GuardedHTTPSConnection

    return {"http": GuardedHTTPPool, "https": GuardedHTTPSPool}


class _GuardedAdapter(requests.adapters.HTTPAdapter):
    """An adapter whose direct connections are checked (proxied ones go to the proxy)."""

    def __init__(self, guard: AddressGuard) -> None:
        self._guard = guard
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _pool_classes(self._guard)
