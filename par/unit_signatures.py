"""D-Bus signatures of the unit properties pystemd 0.11 does not know.

pystemd maps property names to signatures through a global table that lacks
several properties PAR sets (`Restart`, `LogExtraFields`, start limits, newer
sandboxing knobs).  `par.units` merges these with pystemd's table rather than
mutating it.  Each was checked against systemd 252's
org.freedesktop.systemd1.Service interface (`busctl introspect`).
"""

from __future__ import annotations

EXTRA_SIGNATURES: dict[bytes, bytes] = {
    b"Restart": b"s",
    b"RestartUSec": b"t",
    b"LogExtraFields": b"aay",
    b"StartLimitBurst": b"u",
    b"StartLimitIntervalUSec": b"t",
    b"ProtectKernelLogs": b"b",
    b"ProtectClock": b"b",
    b"ProtectHostname": b"b",
    b"RestrictSUIDSGID": b"b",
    b"RestrictNamespaces": b"t",
    b"RestrictAddressFamilies": b"(bas)",
    b"CapabilityBoundingSet": b"t",
    b"AmbientCapabilities": b"t",
    b"ProtectProc": b"s",
    b"ProcSubset": b"s",
    b"UMask": b"u",
    b"OOMPolicy": b"s",
    b"SystemCallErrorNumber": b"i",
    # (address family, IP protocol, number of ports, first port); all zero = "any"
    b"SocketBindAllow": b"a(iiqq)",
    b"SocketBindDeny": b"a(iiqq)",
    b"LogRateLimitIntervalUSec": b"t",
    b"LogRateLimitBurst": b"u",
}
