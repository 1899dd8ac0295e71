"""Bad input against pard under real systemd, over the real API (unix socket and TCP).

Every case of `CASES` is one request; the test asserts the HTTP status, the
error's code and field (in the answer, or for a deploy accepted with 202, in
the deployment record once it failed), that nothing new is left in packages/,
extracted/, venvs/ or the unit list, and that the resident agent, running
since the start of the module, kept its MainPID and still answers /health.

The module's pard runs with small limits so every limit is reached with tiny
inputs: 40 archive entries, 3 MiB unpacked, 256 KiB per package, 2 s per
download, 5 s per dependency install and 5 s for an agent to become ready.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration import agents
from tests.integration.pard import (
    TEST_TOKEN,
    Pard,
    apkg_with,
    free_port,
    new_root,
    running_pard,
    serve_files,
)
from tests.reliability_cases import (
    Answer,
    Case,
    Resident,
    Snapshot,
    Table,
    agent_units,
    json_body,
    main_pid,
    param_node,
    raw_request,
    wait_status,
)
from tests.unit.apkg_factory import (
    GOOD_MAIN,
    GOOD_MANIFEST,
    Entry,
    package,
    pkware_unix_extra,
    write_zip,
)
from tests.wheels import build_hanging_sdist, build_wheel

KIB, MIB = 1024, 1024 * 1024
CONFIG = {
    "installer": {"timeout_s": 5},
    "agents": {"boot_timeout_s": 5},
    "limits": {"max_entries": 40, "max_unpacked_bytes": 3 * MIB, "max_package_bytes": 256 * KIB,
               "download_timeout_s": 2.0, "download_connect_timeout_s": 1.0},
}
SLOW_S = 4.0  # the test server's delay on /slow/: twice limits.download_timeout_s


# ---------------------------------------------------------------- what a case can use


@dataclass
class Ctx:
    """What the cases send requests with."""

    pard: Pard
    files: Path  # packages are written here; also served over HTTP
    http: str  # base URL of `files`
    resident: Resident
    held_port: int  # a port the test listens on

    def apkg(self, name: str, entries: list[Entry]) -> Path:
        return write_zip(self.files / f"{name}.apkg", entries)

    def apkg_files(self, name: str, files: dict[str, str | bytes]) -> Path:
        path = apkg_with(self.files, files)
        return path.rename(self.files / f"{name}.apkg")


def _deploy_body(agent: str, url: object, **extra: object) -> dict:
    return {"deploymentId": f"{agent}-{uuid.uuid4().hex[:8]}", "agentAppId": agent,
            "orgId": "org-rl", "version": "1.0.0", "packageUrl": url, **extra}


def unix(body: bytes | dict, headers: dict[str, str] | None = None) -> Answer:
    """POST /deploy over the unix socket; a dict body gets its deploymentId as Idempotency-Key."""
    if isinstance(body, dict):
        did = body.get("deploymentId")
        headers = {"Idempotency-Key": did, **(headers or {})} if isinstance(did, str) else headers
        body = json_body(body)
    return raw_request("POST", "/deploy", body, headers=headers)


def tcp(ctx: Ctx, body: dict) -> Answer:
    """POST /deploy over TCP, with the token."""
    return raw_request("POST", "/deploy", json_body(body),
                       tcp=ctx.pard.config_extra["listen"]["tcp"], token=TEST_TOKEN)


def fields(**changes: object) -> Callable[[Ctx], Answer]:
    """A deploy of a good local package with some fields changed (None removes the field)."""
    def send(ctx: Ctx) -> Answer:
        body = _deploy_body("bi-fields", f"file://{ctx.files / 'good.apkg'}")
        for key, value in changes.items():
            if value is None:
                body.pop(key, None)
            else:
                body[key] = value
        return unix(body)
    return send


def archive(agent: str, extra: list[Entry]) -> Callable[[Ctx], Answer]:
    """A deploy of the good package plus hostile `extra` entries."""
    def send(ctx: Ctx) -> Answer:
        entries = [Entry("agent.yaml", GOOD_MANIFEST.encode()),
                   Entry("src/main.py", GOOD_MAIN.encode()), *extra]
        return unix(_deploy_body(agent, f"file://{ctx.apkg(agent, entries)}"))
    return send


def raw_file(agent: str, make: Callable[[Path], None]) -> Callable[[Ctx], Answer]:
    """A deploy of a file `make(path)` writes (not a zip, truncated, ...)."""
    def send(ctx: Ctx) -> Answer:
        path = ctx.files / f"{agent}.apkg"
        make(path)
        return unix(_deploy_body(agent, f"file://{path}"))
    return send


def pkg(agent: str, files: dict[str, str], manifest: str | None = GOOD_MANIFEST,
        main: str | None = GOOD_MAIN, **extra: object) -> Callable[[Ctx], Answer]:
    """A deploy of a package with `files` besides agent.yaml (`manifest`) and src/main.py."""
    def send(ctx: Ctx) -> Answer:
        path = package(ctx.files / f"{agent}.apkg", files, manifest=manifest, main=main)
        return unix(_deploy_body(agent, f"file://{path}", **extra))
    return send


def agent_pkg(agent: str, files: Callable[[str], dict[str, str]],
              **extra: object) -> Callable[[Ctx], Answer]:
    """A deploy of one of tests/integration/agents.py's packages."""
    def send(ctx: Ctx) -> Answer:
        return unix(_deploy_body(agent, f"file://{ctx.apkg_files(agent, files(agent))}", **extra))
    return send


def url(agent: str, make_url: Callable[[Ctx], str], **extra: object) -> Callable[[Ctx], Answer]:
    """A deploy of the package URL `make_url(ctx)` gives."""
    def send(ctx: Ctx) -> Answer:
        return unix(_deploy_body(agent, make_url(ctx), **extra))
    return send


def path_request(method: str, path: str) -> Callable[[Ctx], Answer]:
    """A request without a body to `path` ("{resident}" is the resident agent's id)."""
    return lambda ctx: raw_request(method, path.format(resident=ctx.resident.agent_id))


def _truncated(path: Path) -> None:
    package(path, {"big.bin": os.urandom(20_000)})
    path.write_bytes(path.read_bytes()[:-5000])


def _conflict(ctx: Ctx) -> Answer:
    # the resident's deploymentId again, with another version
    d = ctx.pard.client().deployment(ctx.resident.deployment_id)
    body = {**d["request"], "version": "9.9.9"}
    return unix(body)


def _held_port(ctx: Ctx) -> Answer:
    return agent_pkg("bi-port-held", agents.probe,
                     surfaces={"ports": {"rest": ctx.held_port}})(ctx)


def _resident_port(ctx: Ctx) -> Answer:
    return agent_pkg("bi-port-taken", agents.probe,
                     surfaces={"ports": {"rest": ctx.resident.port}})(ctx)


# ---------------------------------------------------------------- the cases


@dataclass(frozen=True)
class BadInput:
    """One bad request and what pard must answer.

    status: the HTTP status of the answer (202: accepted, then the deployment fails).
    code, field: the error's code and field (answer, or the failed deployment's record).
    message_has: a piece the error message must contain (it must tell a person why).
    """

    id: str
    what: str
    send: Callable[[Ctx], Answer]
    status: int
    code: str
    field: str | None = None
    message_has: str = ""

    @property
    def expected(self) -> str:
        where = f" (field `{self.field}`)" if self.field else ""
        why = f', message names "{self.message_has}"' if self.message_has else ""
        if self.status == 202:
            return f"202, then failed `{self.code}`{where}{why}; nothing left on disk"
        return f"{self.status} `{self.code}`{where}{why}; nothing stored"

    def case(self) -> Case:
        return Case(self.id, self.what, self.expected,
                    test=param_node(__name__, "test_bad_input", self.id))


def _b(**kw: object) -> bytes:
    return json_body(_deploy_body("bi-json", "file:///nowhere.apkg", **kw))


CASES: tuple[BadInput, ...] = (
    # -- the body
    BadInput("json-syntax", "body `{\"deploymentId\": ` (cut short)",
             lambda ctx: unix(b'{"deploymentId": '), 400, "bad_json"),
    BadInput("json-empty", "empty body", lambda ctx: unix(b""), 400, "bad_json"),
    BadInput("json-not-utf8", "body with a byte that is not UTF-8",
             lambda ctx: unix(b'{"orgId": "\xff"}'), 400, "bad_json"),
    BadInput("json-nan", "`memoryMB: NaN`", lambda ctx: unix(_b()[:-1] + b', "memoryMB": NaN}'),
             400, "bad_json"),
    BadInput("json-duplicate-key", "`agentAppId` twice (parsers disagree on which wins)",
             lambda ctx: unix(_b()[:-1] + b', "agentAppId": "other"}'), 400, "bad_json",
             message_has="duplicate"),
    BadInput("json-deep", "100 000 nested arrays",
             lambda ctx: unix(b"[" * 100_000 + b"]" * 100_000), 400, "bad_json"),
    BadInput("json-array", "a JSON array", lambda ctx: unix(b"[1, 2]"), 400, "not_object"),
    BadInput("json-string", "a JSON string", lambda ctx: unix(b'"deploy"'), 400, "not_object"),
    BadInput("json-null", "JSON `null`", lambda ctx: unix(b"null"), 400, "not_object"),
    BadInput("body-huge", "a 2 MiB body (limit listen.max_body_bytes = 1 MiB)",
             lambda ctx: unix(b'{"x": "' + b"a" * (2 * MIB) + b'"}'), 413, "body_too_large",
             "Content-Length"),
    # -- missing and wrong-typed fields
    BadInput("missing-deploymentId", "no `deploymentId`", fields(deploymentId=None), 400,
             "missing_field", "deploymentId"),
    BadInput("missing-agentAppId", "no `agentAppId`", fields(agentAppId=None), 400,
             "missing_field", "agentAppId"),
    BadInput("missing-orgId", "no `orgId`", fields(orgId=None), 400, "missing_field", "orgId"),
    BadInput("missing-version", "no `version`", fields(version=None), 400, "missing_field",
             "version"),
    BadInput("missing-packageUrl", "no `packageUrl`", fields(packageUrl=None), 400,
             "missing_field", "packageUrl"),
    BadInput("missing-signedUrl", "`packageUrl: {}` (no signedUrl)", fields(packageUrl={}), 400,
             "missing_field", "packageUrl.signedUrl"),
    BadInput("type-deploymentId", "`deploymentId: 123`", fields(deploymentId=123), 400,
             "invalid_id", "deploymentId"),
    BadInput("type-orgId", "`orgId: [\"x\"]`", fields(orgId=["x"]), 400, "invalid_field",
             "orgId"),
    BadInput("type-memoryMB", "`memoryMB: \"512\"`", fields(memoryMB="512"), 400,
             "invalid_field", "memoryMB"),
    BadInput("type-memoryMB-bool", "`memoryMB: true`", fields(memoryMB=True), 400,
             "invalid_field", "memoryMB"),
    BadInput("range-cpuUnits", "`cpuUnits: 0`", fields(cpuUnits=0), 400, "invalid_field",
             "cpuUnits"),
    BadInput("range-stopTimeoutSec", "`stopTimeoutSec: 99999`", fields(stopTimeoutSec=99999),
             400, "invalid_field", "stopTimeoutSec"),
    BadInput("type-forceRefresh", "`forceRefresh: \"yes\"`", fields(forceRefresh="yes"), 400,
             "invalid_field", "forceRefresh"),
    BadInput("type-env", "`env: [\"A=1\"]`", fields(env=["A=1"]), 400, "invalid_field", "env"),
    BadInput("type-env-value", "`env: {\"K\": 1}`", fields(env={"K": 1}), 400, "invalid_field",
             "env.K"),
    BadInput("env-bad-key", "`env: {\"1BAD\": \"x\"}`", fields(env={"1BAD": "x"}), 400,
             "invalid_field", "env"),
    BadInput("type-port", "`surfaces.ports.rest: \"8080\"`",
             fields(surfaces={"ports": {"rest": "8080"}}), 400, "invalid_field",
             "surfaces.ports.rest"),
    BadInput("range-port", "`surfaces.ports.rest: 80` (privileged)",
             fields(surfaces={"ports": {"rest": 80}}), 400, "invalid_field",
             "surfaces.ports.rest"),
    BadInput("unknown-surface", "`surfaces.ports.grpc: 9000` (a typo)",
             fields(surfaces={"ports": {"grpc": 9000}}), 400, "invalid_field",
             "surfaces.ports.grpc"),
    BadInput("type-packageUrl", "`packageUrl: 42`", fields(packageUrl=42), 400, "invalid_field",
             "packageUrl"),
    BadInput("scheme-packageUrl", "`packageUrl: ftp://...`",
             fields(packageUrl="ftp://127.0.0.1/x.apkg"), 400, "invalid_field", "packageUrl"),
    BadInput("file-url-host", "`file://otherhost/x.apkg`",
             fields(packageUrl="file://otherhost/x.apkg"), 400, "invalid_field", "packageUrl"),
    BadInput("sha-format", "`packageSha256: \"abc\"`", fields(packageSha256="abc"), 400,
             "invalid_field", "packageSha256"),
    # -- ids that try to reach other units or paths
    BadInput("id-unit-suffix", "`agentAppId: \"x.service\"`", fields(agentAppId="x.service"),
             400, "invalid_id", "agentAppId"),
    BadInput("id-unit-instance", "`agentAppId: \"a@b\"` (systemd instance syntax)",
             fields(agentAppId="a@b"), 400, "invalid_id", "agentAppId"),
    BadInput("id-path", "`agentAppId: \"../../etc\"`", fields(agentAppId="../../etc"), 400,
             "invalid_id", "agentAppId"),
    BadInput("id-newline", "`agentAppId` with a newline and a unit directive",
             fields(agentAppId="x\nExecStart=/bin/sh"), 400, "invalid_id", "agentAppId"),
    BadInput("deploymentId-path", "`deploymentId: \"../../x\"`", fields(deploymentId="../../x"),
             400, "invalid_id", "deploymentId"),
    BadInput("version-path", "`version: \"1.0/../../x\"`", fields(version="1.0/../../x"), 400,
             "invalid_id", "version"),
    BadInput("path-id-traversal", "`GET /deployments/..%2F..%2Fetc%2Fpasswd`",
             path_request("GET", "/deployments/..%2F..%2Fetc%2Fpasswd"), 400, "invalid_id",
             "deploymentId"),
    BadInput("path-id-unit", "`POST /deployments/<resident>.service/stop`",
             path_request("POST", "/deployments/{resident}.service/stop"), 400, "invalid_id",
             "deploymentId"),
    # -- idempotency
    BadInput("idempotency-mismatch", "`Idempotency-Key` differs from deploymentId",
             lambda ctx: unix(_b(), {"Idempotency-Key": "someone-else"}), 400,
             "idempotency_mismatch", "Idempotency-Key"),
    BadInput("id-conflict", "the resident's deploymentId again with another version",
             _conflict, 409, "conflict", "deploymentId"),
    # -- local files over TCP
    BadInput("tcp-file-url", "`file://` package URL over TCP (with the token)",
             lambda ctx: tcp(ctx, _deploy_body("bi-tcp", f"file://{ctx.files}/good.apkg")), 403,
             "local_only", "packageUrl"),
    BadInput("tcp-path", "an absolute path as package URL over TCP",
             lambda ctx: tcp(ctx, _deploy_body("bi-tcp", f"{ctx.files}/good.apkg")), 403,
             "local_only", "packageUrl"),
    # -- malformed archives
    BadInput("zip-slip", "entry `../evil.py`", archive("bi-zip-slip", [Entry("../evil.py", b"x")]),
             202, "archive_path_traversal", "../evil.py"),
    BadInput("zip-slip-backslash", "entry `..\\..\\evil.py` (Windows separators)",
             archive("bi-zip-slip-bs", [Entry("..\\..\\evil.py", b"x")]), 202,
             "archive_path_traversal", "..\\..\\evil.py"),
    BadInput("zip-absolute", "entry `/etc/cron.d/evil`",
             archive("bi-zip-abs", [Entry("/etc/cron.d/evil", b"x")]), 202,
             "archive_absolute_path", "/etc/cron.d/evil"),
    BadInput("zip-symlink", "a symlink entry to /etc/passwd",
             archive("bi-zip-symlink", [Entry("link", b"/etc/passwd", stat.S_IFLNK | 0o777)]),
             202, "archive_symlink", "link"),
    BadInput("zip-hardlink", "a hard-link entry (PKWARE unix extra field)",
             archive("bi-zip-hardlink", [Entry("hard", b"", stat.S_IFREG | 0o644,
                                               extra=pkware_unix_extra(b"agent.yaml"))]),
             202, "archive_hardlink", "hard"),
    BadInput("zip-device", "a character device entry",
             archive("bi-zip-device", [Entry("dev", b"", stat.S_IFCHR | 0o644)]), 202,
             "archive_device", "dev"),
    BadInput("zip-fifo", "a fifo entry", archive("bi-zip-fifo", [Entry("pipe", b"",
                                                                      stat.S_IFIFO | 0o644)]),
             202, "archive_fifo", "pipe"),
    BadInput("zip-duplicate", "`src/main.py` twice",
             archive("bi-zip-dup", [Entry("src/main.py", b"again")]), 202, "archive_duplicate",
             "src/main.py"),
    BadInput("zip-bomb-ratio", "a 2 MiB entry of zeros (ratio ~1000, limit 200)",
             archive("bi-bomb-ratio", [Entry("zeros.bin", bytes(2 * MIB))]), 202,
             "archive_ratio", "zeros.bin"),
    BadInput("zip-bomb-total", "4 entries of 900 KiB zeros (limit 3 MiB unpacked)",
             archive("bi-bomb-total", [Entry(f"part{i}.bin", bytes(900 * KIB)) for i in range(4)]),
             202, "archive_too_large", "part3.bin"),
    BadInput("zip-too-many", "50 entries (limit 40)",
             archive("bi-zip-many", [Entry(f"f{i}.txt", b"") for i in range(50)]), 202,
             "archive_too_many_entries", None, "40"),
    BadInput("zip-not-zip", "an HTML error page saved as .apkg",
             raw_file("bi-not-zip", lambda p: p.write_bytes(b"<html>Access denied</html>\n")),
             202, "archive_invalid"),
    BadInput("zip-truncated", "a zip cut 5000 bytes short", raw_file("bi-truncated", _truncated),
             202, "archive_truncated"),
    # -- manifest, .env, requirements
    BadInput("manifest-missing", "no agent.yaml", pkg("bi-no-manifest", {}, manifest=None), 202,
             "manifest_missing", "agent.yaml"),
    BadInput("manifest-yaml", "agent.yaml is not YAML (`name: [oops`)",
             pkg("bi-bad-yaml", {}, manifest="name: [oops\n"), 202, "manifest_yaml",
             "agent.yaml"),
    BadInput("manifest-name", "`name: Bad_Name`",
             pkg("bi-bad-name", {}, manifest="name: Bad_Name\nversion: '1.0'\n"), 202,
             "manifest_invalid", "name"),
    BadInput("manifest-entrypoint", "`entrypoint: main` (no function)",
             pkg("bi-bad-entry", {}, manifest="name: x\nversion: '1'\nentrypoint: main\n"), 202,
             "manifest_invalid", "entrypoint"),
    BadInput("manifest-ui-escape", "`ui.path: ../../etc`",
             pkg("bi-ui-escape", {}, manifest="name: x\nversion: '1'\nui:\n  path: ../../etc\n"),
             202, "manifest_invalid", "ui.path"),
    BadInput("dotenv-invalid", ".env line without `=`", pkg("bi-dotenv", {".env": "JUST_A_WORD\n"}),
             202, "dotenv_invalid", ".env"),
    BadInput("req-editable", "requirements.txt `-e git+https://...`",
             pkg("bi-req-editable",
                 {"requirements.txt": "-e git+https://example.com/x.git#egg=x\n"}),
             202, "requirements_editable", "requirements.txt"),
    BadInput("req-index", "requirements.txt `--index-url http://evil/simple`",
             pkg("bi-req-index", {"requirements.txt": "--index-url http://evil/simple\nx\n"}),
             202, "requirements_index_option", "requirements.txt"),
    BadInput("req-local-path", "requirements.txt `../other-agent`",
             pkg("bi-req-local", {"requirements.txt": "../other-agent\n"}), 202,
             "requirements_local", "requirements.txt"),
    BadInput("req-include", "requirements.txt `-r /etc/shadow`",
             pkg("bi-req-include", {"requirements.txt": "-r /etc/shadow\n"}), 202,
             "requirements_option", "requirements.txt"),
    # -- package URLs
    BadInput("url-unreachable", "http URL of a port nothing listens on",
             url("bi-url-unreach", lambda ctx: f"http://127.0.0.1:{free_port()}/x.apkg"), 202,
             "package_download_failed", "packageUrl", "attempt"),
    BadInput("url-404", "http URL answering 404",
             url("bi-url-404", lambda ctx: f"{ctx.http}/missing.apkg"), 202,
             "package_download_failed", "packageUrl", "404"),
    BadInput("url-slow", f"server answers after {SLOW_S:g} s (limits.download_timeout_s = 2)",
             url("bi-url-slow", lambda ctx: f"{ctx.http}/slow/good.apkg"), 202,
             "package_download_timeout", "packageUrl"),
    BadInput("url-oversized", "a 300 KiB package (limits.max_package_bytes = 256 KiB)",
             url("bi-url-big", lambda ctx: f"{ctx.http}/oversized.apkg"), 202,
             "package_too_large", "packageUrl", "limits.max_package_bytes"),
    BadInput("file-oversized", "the same 300 KiB package as a local file",
             url("bi-file-big", lambda ctx: f"file://{ctx.files}/oversized.apkg"), 202,
             "package_too_large", "packageUrl"),
    BadInput("sha-mismatch", "`packageSha256` of other bytes",
             url("bi-sha", lambda ctx: f"{ctx.http}/good.apkg", packageSha256="0" * 64), 202,
             "package_sha_mismatch", "packageSha256"),
    BadInput("file-missing", "`file://` of a file that does not exist",
             url("bi-file-missing", lambda ctx: "file:///var/lib/par-it/no-such.apkg"), 202,
             "package_not_found", "packageUrl"),
    # -- install and start
    BadInput("req-not-found", "requirement `no-such-package-rl==9.9`",
             pkg("bi-req-missing", {"requirements.txt": "no-such-package-rl==9.9\n"}), 202,
             "dependency_install_failed", "requirements.txt", "no-such-package-rl"),
    BadInput("install-hangs", "a build that never ends (installer.timeout_s = 5)",
             pkg("bi-hang", {"requirements.txt": "rlhang\n"}), 202, "dependency_install_timeout",
             "requirements.txt", "timed out"),
    BadInput("import-fails", "the entrypoint imports a module that does not exist",
             agent_pkg("bi-import", agents.import_error), 202, "agent_start_failed", None,
             "no_such_module_par_test"),
    BadInput("never-ready", "the agent never becomes ready (agents.boot_timeout_s = 5)",
             agent_pkg("bi-never-ready", agents.never_ready), 202, "agent_start_failed", None,
             "boot_timeout_s"),
    BadInput("port-held", "`surfaces.ports.rest`: a port another process listens on",
             _held_port, 202, "port_in_use", "surfaces.ports.rest"),
    BadInput("port-taken", "`surfaces.ports.rest`: the resident agent's port",
             _resident_port, 202, "port_in_use", "surfaces.ports.rest"),
)

DISK_FULL = Case("disk-full", "a deploy whose venv needs a 24 MiB wheel, with the state "
                 "directory on a 16 MiB tmpfs", "202, then failed `disk_full` "
                 "(\"No space left on device\"); no half-built venv, the space is free again; "
                 "the resident agent untouched")

PACKAGE_URL_DENIED = Case(
    "url-denied-address", "`packageUrl` on an address of agents.ip_address_deny (a listener "
    "there, nothing there, a redirect to it from an allowed server, 169.254.169.254)",
    "failed `package_url_forbidden` (field `packageUrl`), the same message listening or not; "
    "no request reaches the address; a redirect between allowed addresses is followed",
    "tests/integration/test_attacks.py::test_attack_12_package_url_reaches_only_what_agents_may")

TABLE = Table(
    key="bad-input",
    title="Bad input",
    intro="Each case sends one bad request to pard in the systemd sandbox (unix socket, or TCP "
          "with the token) and checks the status, the error's `code` and `field`, that nothing "
          "new is left in `packages/`, `extracted/`, `venvs/` or the unit list, and that an agent "
          "running since before the case kept its MainPID and answers `/health` 200. pard runs "
          "with small limits: 40 entries, 3 MiB unpacked, 256 KiB per package, 2 s per download, "
          "5 s per install and 5 s to become ready.",
    module=__name__,
    cases=tuple(c.case() for c in CASES) + (DISK_FULL, PACKAGE_URL_DENIED),
)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pard() -> Iterator[Pard]:
    with running_pard("bi", CONFIG) as p:
        yield p


@pytest.fixture(scope="module")
def ctx(pard: Pard) -> Iterator[Ctx]:
    files = pard.root / "bi-files"
    files.mkdir()
    package(files / "good.apkg", {})
    (files / "oversized.apkg").write_bytes(os.urandom(300 * KIB))
    build_hanging_sdist(pard.local_packages, "rlhang", "1.0")
    resident = pard.deploy("bi-resident", apkg_with(files, agents.probe("bi-resident")))
    assert resident["status"] == "healthy", resident
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    with serve_files(files, slow_s=SLOW_S) as base, holder:
        yield Ctx(pard, files, base, Resident("bi-resident", resident["deploymentId"],
                                              main_pid("par-agent@bi-resident.service"),
                                              resident["ports"]["rest"]),
                  holder.getsockname()[1])


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: BadInput, ctx: Ctx) -> None:
    client = ctx.pard.client()
    before = Snapshot.take(ctx.pard.state)
    records = {d["deploymentId"]: d for d in client.deployments()["deployments"]}

    answer = case.send(ctx)

    assert answer.status == case.status, answer
    if case.status == 202:
        assert answer.body["status"] == "accepted", answer
        d = wait_status(client, answer.body["deploymentId"], timeout=90)
        assert d["status"] == "failed", d
        assert d["current"] is False
        error = d["error"]
    else:
        error = answer.error
        # refused before anything was stored: the same records, unchanged
        assert {d["deploymentId"]: d for d in client.deployments()["deployments"]} == records
    assert (error.get("code"), error.get("field")) == (case.code, case.field), error
    assert error["message"], error
    assert case.message_has in error["message"], error
    before.assert_same(ctx.pard.state)
    ctx.resident.assert_untouched()


def test_disk_full(pard: Pard, ctx: Ctx) -> None:
    """Swaps the module's pard for one whose state dir is a 16 MiB tmpfs, then back."""
    pard.stop()  # the resident keeps running: agents are their own units
    disk = Pard(new_root("bi-disk"))
    state = disk.root / "state"
    state.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "rl-disk-full",
                    str(state)], check=True, timeout=30)
    units_before = set(agent_units())
    try:
        build_wheel(disk.local_packages, "rlbig", "1.0",
                    data={"rlbig/blob.bin": os.urandom(24 * MIB)})
        disk.start()
        small = disk.deploy("bi-disk-resident", apkg_with(disk.root / "apkg",
                                                          agents.probe("bi-disk-resident")))
        assert small["status"] == "healthy", small
        resident = Resident("bi-disk-resident", small["deploymentId"],
                            main_pid("par-agent@bi-disk-resident.service"), small["ports"]["rest"])
        free_before = os.statvfs(state).f_bavail
        before = Snapshot.take(disk.state)

        apkg = apkg_with(disk.root / "apkg", agents.with_requirements("bi-disk-big", "rlbig\n"))
        d = disk.deploy("bi-disk-big", apkg)

        assert d["status"] == "failed", d
        assert d["error"]["code"] == "disk_full", d["error"]
        assert "No space left on device" in d["error"]["message"]
        before.assert_same(disk.state)
        assert not [p for p in (disk.state / "venvs").iterdir() if p.name.startswith(".tmp-")]
        # the half-written venv is gone: (almost) all the space is back
        # (1 MiB of slack for the store's own writes)
        assert os.statvfs(state).f_bavail * os.statvfs(state).f_frsize >= \
            free_before * os.statvfs(state).f_frsize - MIB
        resident.assert_untouched()
        assert disk.client().daemon_health()["ok"] is True
    finally:
        disk.stop()
        for unit in set(agent_units()) - units_before:
            subprocess.run(["systemctl", "stop", unit], capture_output=True, timeout=60)
            subprocess.run(["systemctl", "reset-failed", unit], capture_output=True, timeout=30)
        subprocess.run(["umount", str(state)], check=False, timeout=30)
        shutil.rmtree(disk.root, ignore_errors=True)
        pard.start()
    ctx.resident.assert_untouched()  # the module's pard adopted it again
