"""`python -m par.front`: the front door process (unit `par-front.service`).

Serves on the socket systemd passes (`par-front.socket`, LISTEN_FDS), so a
restart or an upgrade of this process refuses no connection: while it is
down, connections wait in the socket's backlog.  `--listen HOST:PORT` binds
its own socket instead (benchmarks, development).  READY=1 once serving;
on SIGTERM it stops accepting, finishes the requests it is answering and
exits.  pard passes every setting on the command line: the process reads
nothing but the routes file.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import sdnotify
from aiohttp import ClientSession, ClientTimeout, DummyCookieJar, TCPConnector

from par import log
from par.front.proxy import Proxy, Settings
from par.front.routes import RoutesFile
from par.front.server import GuardedServer, Limits

SD_LISTEN_FDS_START = 3
# Seconds a stopping front door lets requests it is answering finish (below TimeoutStopSec).
DRAIN_S = 20.0
# Keep-alive connections kept to each agent port.
POOL_PER_HOST = 256
# Request headers aiohttp's client would add of its own: the caller's, if it sent them, are
# forwarded as they were; the front door adds none.
SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="par-front", description="PAR's front door")
    p.add_argument("--routes", type=Path, required=True, help="routes file pard publishes")
    p.add_argument("--listen", help="HOST:PORT to bind when systemd passes no socket")
    p.add_argument("--upstream-host", default="127.0.0.1", help="where agents listen")
    p.add_argument("--isolate-loopback", action="store_true",
                   help="agents listen on addresses of their own (agents.isolate_loopback)")
    p.add_argument("--source-address",
                   help="loopback address to connect to agents from (front.source_address)")
    p.add_argument("--hold-s", type=float, default=30.0)
    p.add_argument("--max-body-bytes", type=int, default=10 * 1024 * 1024)
    p.add_argument("--max-connections", type=int, default=1024)
    p.add_argument("--header-timeout-s", type=float, default=10.0)
    p.add_argument("--body-timeout-s", type=float, default=30.0)
    p.add_argument("--idle-timeout-s", type=float, default=75.0)
    return p.parse_args(argv)


def inherited_socket() -> socket.socket | None:
    """The listening socket systemd passed (LISTEN_FDS, for this very process), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS", "0") or 0) < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for children
    return socket.socket(fileno=SD_LISTEN_FDS_START)


def own_socket(listen: str) -> socket.socket:
    """A listening socket bound to `listen` ("HOST:PORT", "[::1]:PORT")."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(1024)
    return sock


def agent_sessions(timeout: ClientTimeout,
                   source: str | None = None) -> tuple[ClientSession, ClientSession]:
    """The client sessions to agents: a keep-alive pool, and one opening a new connection
    per request.  No cookie jar: cookies an agent sets belong to the caller, never to the
    front door (a shared jar would hand one caller's cookies to the next).  A request on a
    pooled connection looks up no name (the agents' address is an IP; a name would be
    resolved only to open a connection, and cached).  `source`: the address every
    connection is bound to before it connects (isolated agents accept only it,
    par.loopback)."""
    local = (source, 0) if source else None
    session = ClientSession(connector=TCPConnector(limit=0, limit_per_host=POOL_PER_HOST,
                                                   local_addr=local),
                            timeout=timeout, auto_decompress=False,
                            cookie_jar=DummyCookieJar(), skip_auto_headers=SKIP_AUTO_HEADERS)
    fresh = ClientSession(connector=TCPConnector(limit=0, force_close=True, local_addr=local),
                          timeout=timeout, auto_decompress=False, cookie_jar=DummyCookieJar(),
                          skip_auto_headers=SKIP_AUTO_HEADERS)
    return session, fresh


async def serve(args: argparse.Namespace, sock: socket.socket, logger: logging.Logger) -> None:
    """Serve until SIGTERM/SIGINT, then drain."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    settings = Settings(hold_s=args.hold_s, max_body_bytes=args.max_body_bytes,
                        body_timeout_s=args.body_timeout_s, upstream_host=args.upstream_host,
                        isolate_loopback=args.isolate_loopback)
    # no total timeout: answers may stream for as long as the agent writes
    timeout = ClientTimeout(total=None, sock_connect=settings.connect_timeout_s)
    session, fresh = agent_sessions(timeout, args.source_address)
    server: GuardedServer | None = None
    listener: asyncio.base_events.Server | None = None
    try:
        proxy = Proxy(RoutesFile(args.routes), settings, session, fresh)
        server = GuardedServer(
            proxy.handle, Limits(args.max_connections, args.header_timeout_s),
            keepalive_timeout=args.idle_timeout_s, auto_decompress=False, access_log=None)
        proxy.draining = lambda: server is not None and server.draining
        listener = await loop.create_server(server, sock=sock, backlog=1024)
        # Everything the process has allocated so far (modules, aiohttp, the sessions) lives
        # as long as it does: keep the collector from walking it.  Under load the full
        # collections that walked it paused every request in flight for about 10 ms each.
        gc.freeze()
        address = sock.getsockname()
        log.event(logger, "front door ready", address=f"{address[0]}:{address[1]}",
                  routes=str(args.routes))
        sdnotify.SystemdNotifier().notify("READY=1")
        await stop.wait()
        sdnotify.SystemdNotifier().notify("STOPPING=1")
        listener.close()  # systemd keeps the socket: new connections wait for the next process
        await server.drain(DRAIN_S)
    finally:
        if listener is not None:
            listener.close()
        await session.close()
        await fresh.close()
    log.event(logger, "front door stopped")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m par.front`."""
    args = parse_args(argv)
    logger = log.setup()
    sock = inherited_socket()
    if sock is None:
        if not args.listen:
            log.event(logger, "front door has no socket", logging.ERROR,
                      hint="run it from par-front.socket or pass --listen HOST:PORT")
            return 2
        sock = own_socket(args.listen)
    asyncio.run(serve(args, sock, logger))
    return 0


if __name__ == "__main__":
    sys.exit(main())
