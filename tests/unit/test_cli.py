"""parctl against a fake pard (see test_client.py): output, requests sent, exit codes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import click
import pytest
from click.testing import CliRunner, Result

from par import __version__
from par.cli import App, cli, progress
from par.cli.deploy_source import KEEP_PACKED, resolve_source
from par.cli.progress import PhasePrinter
from par.client import Client
from tests.unit.test_client import (
    STATUSES,
    FakePard,
    Seen,
    daemon_health,
    error,
    health,
    record,
    unit,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> App:
    """No polling delay; a config of our own (state and cache dirs in tmp), and parctl's
    cache of packed folders in tmp."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    state, cache = tmp_path / "state", tmp_path / "cache"
    state.mkdir(mode=0o755)
    cache.mkdir(mode=0o755)
    config = tmp_path / "par.yaml"
    config.write_text(f"paths:\n  state_dir: {state}\n  cache_dir: {cache}\n")
    return App(poll_interval=0, config_path=config)


def run(sock: Path, app: App, *args: str) -> Result:
    runner = CliRunner(mix_stderr=False)
    return runner.invoke(cli, ["--socket", str(sock), *args], obj=app, catch_exceptions=False)


def script_deploy(pard: FakePard, statuses: tuple[str, ...] = STATUSES, **over: object) -> None:
    """POST /deploy accepts; each GET of the deployment moves one status further."""
    def accept(seen: Seen, _m: re.Match) -> tuple[int, dict]:
        dep = seen.body["deploymentId"]
        rec = record("pending", agent=seen.body["agentAppId"], deployment_id=dep,
                     version=seen.body["version"])
        return 202, {"status": "accepted", "deploymentId": dep, "deployment": rec}

    queue = list(statuses)

    def poll(seen: Seen, m: re.Match) -> tuple[int, dict]:
        status = queue.pop(0) if len(queue) > 1 else queue[0]
        body = next(s.body for s in pard.requests if s.method == "POST" and s.path == "/deploy")
        return 200, record(status, agent=body["agentAppId"], deployment_id=m.group(1),
                           version=body["version"], **over)

    pard.on("POST", "/deploy", accept)
    pard.on("GET", "/deployments/([^/]+)", poll)
    pard.on("GET", "/deployments/[^/]+/events", (200, {"events": [
        {"ts": 1764200000.2, "event": "Creating virtual environment", "message": "",
         "fields": {"venv": "hello_1a2b3c4", "installer": "uv"}}]}))


def deploy_body(pard: FakePard) -> Seen:
    (seen,) = [s for s in pard.requests if s.method == "POST" and s.path == "/deploy"]
    return seen


def make_agent(root: Path, manifest: str) -> Path:
    folder = root / "hello"
    (folder / "src").mkdir(parents=True)
    (folder / "agent.yaml").write_text(manifest)
    (folder / "src" / "main.py").write_text("def handler(context):\n    return {'ok': True}\n")
    return folder


# -- help --------------------------------------------------------------------------


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        yield prefix + (name,)
        if isinstance(command, click.Group):
            yield from _commands(command, prefix + (name,))


def test_top_level_help_documents_the_exit_codes() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for line in ("0  ok", "1  the operation failed", "2  usage error",
                 "3  status: the agent is not running", "4  not found",
                 "69 pard unreachable (start it with `systemctl start par`)"):
        assert line in result.output


def test_every_command_has_a_clear_help() -> None:
    paths = list(_commands(cli))
    expected = {("deploy",), ("list",), ("deployments",), ("status",), ("health",), ("logs",),
                ("stop",), ("start",),
                ("restart",), ("rm",), ("venv",), ("venv", "list"), ("venv", "prune"),
                ("venv", "prewarm"), ("pack",), ("installer",), ("installer", "install-uv"),
                ("token",), ("token", "create"), ("doctor",), ("version",),
                ("env",), ("env", "list"), ("env", "set"), ("env", "unset")}
    assert set(paths) == expected
    for path in paths:
        result = CliRunner().invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, path
        assert result.output.startswith(f"Usage: parctl {' '.join(path)}"), path
        summary = result.output.split("\n\n")[1].strip()
        assert len(summary) > 15 and summary.endswith("."), (path, summary)
        command = cli
        for name in path:
            command = command.commands[name]  # type: ignore[attr-defined]
        if any(p.name == "as_json" for p in command.params):
            assert "--json" in result.output


# -- deploy ------------------------------------------------------------------------


def test_deploy_folder_packs_it_and_shows_the_phases(pard: FakePard, app: App,
                                                     tmp_path: Path) -> None:
    pytest.importorskip("par.pack", reason="par.pack (pack_folder) is not written yet")
    # no top-level version: metadata.version is the agent's own (design.md)
    folder = make_agent(tmp_path, "name: hello\nmetadata:\n  version: 1.2.0\n")
    script_deploy(pard)
    seen_package: list[bool] = []
    original = pard.dispatch

    def dispatch(seen: Seen) -> tuple[int, object]:
        if seen.path == "/deploy":
            path = Path(unquote(urlsplit(seen.body["packageUrl"]).path))
            seen_package.append(path.is_file() and zipfile.is_zipfile(path)
                                and hashlib.sha256(path.read_bytes()).hexdigest()
                                == seen.body["packageSha256"])
        return original(seen)

    pard.dispatch = dispatch  # type: ignore[method-assign]

    result = run(pard.socket_path, app, "deploy", str(folder))

    assert result.exit_code == 0, result.output + result.stderr
    body = deploy_body(pard).body
    assert body["agentAppId"] == "hello" and body["version"] == "1.2.0"
    assert body["packageUrl"].startswith("file:///")
    assert seen_package == [True], "pard must get a readable .apkg with the announced sha256"
    # kept in parctl's cache, named by its bytes: the record's packageUrl stays valid
    kept = Path(unquote(urlsplit(body["packageUrl"]).path))
    assert kept.is_file() and kept.parent == tmp_path / "xdg-cache" / "parctl" / "packages"
    assert kept.name == f"hello-1.2.0-{body['packageSha256'][:12]}.apkg"
    assert re.fullmatch(r"hello-\d{8}T\d{6}Z-[0-9a-f]{4}", body["deploymentId"])
    lines = result.output.splitlines()
    for expected in ("downloading ... 0.1s", "building venv: uv 3.2s", "starting ... 0.8s",
                     "healthy"):
        assert expected in lines, result.output
    assert "  unit:    par-agent@hello.service" in lines
    assert "  health:  http://127.0.0.1:8100/health" in lines
    assert "systemctl status par-agent@hello" in result.output


def test_deploy_apkg_reads_the_manifest_from_the_zip(pard: FakePard, app: App,
                                                     tmp_path: Path) -> None:
    package = tmp_path / "hello.apkg"
    with zipfile.ZipFile(package, "w") as zf:
        zf.writestr("agent.yaml", "name: hello\nversion: '2.0.1'\nmetadata:\n  version: 9.9.9\n")
        zf.writestr("src/main.py", "def handler(context):\n    return {}\n")
    script_deploy(pard, venvReused=True)

    result = run(pard.socket_path, app, "deploy", str(package), "--env", "A=1", "--env", "B=x=y",
                 "--memory", "512", "--cpu", "1024", "--stop-timeout", "20")

    assert result.exit_code == 0, result.output + result.stderr
    seen = deploy_body(pard)
    body = seen.body
    assert body["agentAppId"] == "hello" and body["version"] == "2.0.1"
    assert body["packageUrl"] == package.resolve().as_uri()
    assert body["packageSha256"] == hashlib.sha256(package.read_bytes()).hexdigest()
    assert body["env"] == {"A": "1", "B": "x=y"}
    assert (body["memoryMB"], body["cpuUnits"], body["stopTimeoutSec"]) == (512, 1024, 20)
    assert seen.headers["idempotency-key"] == body["deploymentId"]
    assert "building venv: reused" in result.output.splitlines()


def test_deploy_url_with_id_and_version(pard: FakePard, app: App) -> None:
    script_deploy(pard)
    sha = "AB" * 32
    result = run(pard.socket_path, app, "deploy", "https://example.com/h.apkg", "--id", "web-1",
                 "--version", "3.1.4", "--sha256", sha)
    assert result.exit_code == 0, result.output + result.stderr
    body = deploy_body(pard).body
    assert body == {"deploymentId": body["deploymentId"], "agentAppId": "web-1", "orgId": "",
                    "version": "3.1.4", "packageUrl": "https://example.com/h.apkg",
                    "packageSha256": sha.lower()}
    assert body["deploymentId"].startswith("web-1-")
    # it followed the deployment until healthy, one status per request: after the first,
    # each asks pard to answer on the next change (no polling)
    path = f"GET /deployments/{body['deploymentId']}"
    polls = [c for c in pard.calls("GET") if c.split("?")[0] == path]
    assert polls[0] == path and len(polls) == len(STATUSES)
    assert all(re.fullmatch(re.escape(path) + r"\?wait=30&since=[0-9.]+", c) for c in polls[1:])


def test_deploy_url_needs_id_and_version(pard: FakePard, app: App) -> None:
    result = run(pard.socket_path, app, "deploy", "https://example.com/h.apkg", "--version", "1")
    assert result.exit_code == 2
    assert "--id is required" in result.stderr
    assert pard.requests == []


def test_deploy_refuses_bad_options_as_usage_errors(pard: FakePard, app: App) -> None:
    url = "https://example.com/h.apkg"
    for args in (["--env", "1BAD=x"], ["--env", "NOEQUALS"], ["--memory", "8"],
                 ["--sha256", "xyz"], ["--id", "../etc"]):
        result = run(pard.socket_path, app, "deploy", url, "--id", "h", "--version", "1", *args)
        assert result.exit_code == 2, args
    result = run(pard.socket_path, app, "deploy", "/no/such/folder")
    assert result.exit_code == 2
    assert "not a folder, an .apkg file or an http(s) URL" in result.stderr
    assert pard.requests == []


def test_deploy_folder_without_manifest_fails_before_calling_pard(pard: FakePard, app: App,
                                                                  tmp_path: Path) -> None:
    result = run(pard.socket_path, app, "deploy", str(tmp_path))
    assert result.exit_code == 1
    assert result.stderr == f"parctl: {tmp_path} has no agent.yaml: is it an agent folder?\n"
    assert pard.requests == []


def test_deploy_folder_no_wait_returns_at_once_and_keeps_the_package(
        pard: FakePard, app: App, tmp_path: Path) -> None:
    folder = make_agent(tmp_path, "name: hello\nversion: '1.0.0'\n")
    script_deploy(pard)
    result = run(pard.socket_path, app, "deploy", str(folder), "--no-wait")
    assert result.exit_code == 0, result.stderr
    assert "parctl status hello" in result.output
    assert pard.calls()[1:] == []  # nothing to wait for: the packed file stays
    assert Path(unquote(urlsplit(deploy_body(pard).body["packageUrl"]).path)).is_file()


def test_parctl_keeps_the_newest_packed_folders_per_agent(tmp_path: Path) -> None:
    folder = make_agent(tmp_path, "name: hello\nversion: '1.0.0'\n")
    cache = tmp_path / "cache"
    kept = []
    for i in range(KEEP_PACKED + 2):
        (folder / "data.txt").write_text(str(i))  # other bytes, another package
        kept.append(resolve_source(str(folder), cache).url)
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == KEEP_PACKED and not any(n.startswith(".") for n in names)
    assert all(Path(unquote(urlsplit(u).path)).is_file() for u in kept[-KEEP_PACKED:])


def test_deploy_failure_shows_the_daemons_message_and_exits_1(pard: FakePard, app: App) -> None:
    message = ("Dependency installation failed: ERROR: No matching distribution found for "
               "nosuchpkg==9.9")
    script_deploy(pard, ("pending", "downloading", "loading", "failed"),
                  error={"code": "install_failed", "message": message, "field": "requirements.txt"})
    result = run(pard.socket_path, app, "deploy", "https://x.test/a.apkg", "--id", "hello",
                 "--version", "1.0.0")
    assert result.exit_code == 1
    assert "downloading ... 0.1s" in result.output
    assert result.output.splitlines()[-1] == "failed"
    assert result.stderr == f"parctl: deploy of hello failed: {message}\n"


def test_deploy_json_prints_the_final_record(pard: FakePard, app: App) -> None:
    script_deploy(pard)
    result = run(pard.socket_path, app, "deploy", "https://x.test/a.apkg", "--id", "hello",
                 "--version", "1.0.0", "--json")
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["status"] == "healthy" and data["unit"] == "par-agent@hello.service"


def test_deploy_no_wait_returns_after_the_202(pard: FakePard, app: App) -> None:
    script_deploy(pard)
    result = run(pard.socket_path, app, "deploy", "https://x.test/a.apkg", "--id", "hello",
                 "--version", "1.0.0", "--no-wait", "--json")
    assert result.exit_code == 0
    assert json.loads(result.output)["status"] == "accepted"
    assert pard.calls() == ["POST /deploy"]


def test_phase_printer_updates_one_line_on_a_terminal() -> None:
    out = io.StringIO()
    printer = PhasePrinter(tty=True, write=out.write)
    printer.show(record("downloading"), None, now=1764200000.05)
    printer.show(record("loading"), None, now=1764200000.2)
    printer.show(record("healthy"), "pip", now=1764200005.0)
    printer.line("healthy")
    text = out.getvalue()
    assert "\r\x1b[Kdownloading ... 0.1s" in text  # in progress, updated in place
    final = [line.split("\r\x1b[K")[-1] for line in text.split("\n") if line]
    assert final == ["downloading ... 0.1s", "building venv: pip 3.2s", "starting ... 0.8s",
                     "healthy"]


class TickingClient:
    """Answers the same `loading` record until the 6th call: a long venv build."""

    def __init__(self) -> None:
        self.waits: list[float | None] = []

    def deployment(self, deployment_id: str, wait: float | None = None,
                   since: float | None = None) -> dict:
        self.waits.append(wait)
        if wait:
            time.sleep(min(wait, 0.2))  # pard holds an unchanged record (up to `wait`)
        return record("healthy" if len(self.waits) >= 6 else "loading")

    def events(self, deployment_id: str, limit: int = 100) -> dict:
        return {"events": []}


@pytest.mark.parametrize("tty", [True, False])
def test_the_running_phase_ticks_on_a_terminal(app: App, tty: bool) -> None:
    client, out = TickingClient(), io.StringIO()
    printer = PhasePrinter(tty=tty, write=out.write)
    started = time.monotonic()
    progress.wait_for(app, client, "d-1", printer)  # type: ignore[arg-type]
    if tty:
        # asked every 0.2 s, and each answer redrew the clock of "building venv"
        assert set(client.waits[1:]) == {progress.TICK_S}
        assert out.getvalue().count("\r\x1b[Kbuilding venv ...") == 5
        assert time.monotonic() - started < 3
    else:
        assert set(client.waits[1:]) == {progress.WAIT_S}
        assert "\r" not in out.getvalue()


# -- looking at agents ---------------------------------------------------------------


def agents_payload() -> dict:
    return {"agents": [{"agentAppId": "hello", "deployment": record(),
                        "unit": unit(restarts=2),
                        "resources": {"rssBytes": 85 * 1024**2, "cpuSeconds": 1.5}}]}


def test_list_table_and_json(pard: FakePard, app: App) -> None:
    pard.on("GET", "/agents", (200, agents_payload()))
    result = run(pard.socket_path, app, "list")
    assert result.exit_code == 0
    header, row = result.output.splitlines()
    assert header.split() == ["ID", "VERSION", "STATUS", "PORTS", "UPTIME", "MEMORY", "RESTARTS"]
    assert row.split()[:3] == ["hello", "1.0.0", "healthy"]
    assert "rest 8100 a2a 50100 ui 3100" in row and "1h2m" in row and "85.0 MiB" in row
    assert row.split()[-1] == "2"

    result = run(pard.socket_path, app, "list", "--json")
    assert json.loads(result.output) == json.loads(json.dumps(agents_payload())) | {
        "agents": json.loads(result.output)["agents"]}
    assert json.loads(result.output)["agents"][0]["deployment"]["status"] == "healthy"


def test_list_without_agents_says_how_to_deploy(pard: FakePard, app: App) -> None:
    pard.on("GET", "/agents", (200, {"agents": []}))
    result = run(pard.socket_path, app, "list")
    assert result.exit_code == 0 and "parctl deploy" in result.output


def routes_for_hello(pard: FakePard, healthy: bool = True) -> None:
    """pard reads /deployments/{id} as a deploymentId, else as an agent id (its current one)."""
    pard.on("GET", "/deployments/(hello|hello-d2)", (200, record(deployment_id="hello-d2")))
    pard.on("GET", "/deployments/hello-d2/health", (200, health(healthy)))
    pard.on("GET", "/deployments/hello-d2/events", (200, {"events": [
        {"ts": 1764200000.1, "event": "Reusing existing venv", "message": "",
         "fields": {"venv": "hello_1a2b3c4"}},
        {"ts": 1764200001.0, "event": "Agent subprocess started", "message": "pid 4242",
         "fields": {}}]}))


def test_status_text_and_json(pard: FakePard, app: App) -> None:
    routes_for_hello(pard)
    result = run(pard.socket_path, app, "status", "hello")
    assert result.exit_code == 0, result.stderr
    assert pard.calls() == ["GET /deployments/hello", "GET /deployments/hello-d2/health",
                            "GET /deployments/hello-d2/events?limit=10"]
    text = result.output
    assert "hello 1.0.0: healthy (current)" in text
    assert "par-agent@hello.service  active (running), pid 4242, restarts 0" in text
    assert "venv:       hello_1a2b3c4" in text
    # the phases named as parctl deploy names them
    assert "phases:     downloading 0.1s, building venv 3.2s, starting 0.8s" in text
    assert "Reusing existing venv" in text and "Agent subprocess started: pid 4242" in text

    result = run(pard.socket_path, app, "status", "hello", "--json")
    data = json.loads(result.output)
    assert data["deployment"]["deploymentId"] == "hello-d2"
    assert data["health"]["healthy"] is True
    assert [e["event"] for e in data["events"]] == ["Reusing existing venv",
                                                    "Agent subprocess started"]


def test_health_json_and_unhealthy_exit_code(pard: FakePard, app: App) -> None:
    routes_for_hello(pard)
    result = run(pard.socket_path, app, "health", "hello", "--json")
    assert result.exit_code == 0
    assert json.loads(result.output)["healthy"] is True

    routes_for_hello(pard, healthy=False)
    result = run(pard.socket_path, app, "health", "hello")
    assert result.exit_code == 1
    assert "hello: unhealthy (deployment failed)" in result.output and "restarts 3" in result.output


@pytest.mark.parametrize(("args", "call"), [
    (["stop", "hello"], "POST /deployments/hello/stop"),
    (["start", "hello"], "POST /deployments/hello/start"),
    (["restart", "hello"], "POST /deployments/hello/restart"),
    (["rm", "hello"], "DELETE /deployments/hello"),
    (["rm", "hello", "--purge"], "DELETE /deployments/hello?purge=1"),
    (["stop", "Hello-D2"], "POST /deployments/Hello-D2/stop"),
])
def test_actions_call_their_endpoint(pard: FakePard, app: App, args: list[str], call: str) -> None:
    pard.on("POST", "/deployments/[^/]+/(stop|start|restart)",
            lambda _s, m: (200, record({"stop": "stopped"}.get(m.group(1), "healthy"),
                                       deployment_id="hello-d2")))
    purged = ["/var/lib/pixell-runtime/packages/hello@1.0.0.apkg"]
    pard.on("DELETE", "/deployments/[^/]+", lambda s, _m: (200, {
        "deleted": "hello-d2", "agentAppId": "hello", "purged": purged if s.query else []}))

    result = run(pard.socket_path, app, *args)
    assert result.exit_code == 0, result.stderr
    assert pard.calls() == [call]
    if args[0] == "stop":
        assert result.output == "stopped hello: stopped (par-agent@hello.service)\n"
    if "--purge" in args:
        assert f"deleted {purged[0]}" in result.output

    result = run(pard.socket_path, app, *args, "--json")
    assert result.exit_code == 0
    assert isinstance(json.loads(result.output), dict)


def test_unknown_agent_exits_4(pard: FakePard, app: App) -> None:
    # the fake answers 404 not_found for every route it does not know
    result = run(pard.socket_path, app, "status", "ghost")
    assert result.exit_code == 4
    assert result.stderr == ("parctl: no agent or deployment named 'ghost' "
                             "(parctl list shows the agents)\n")

    for args in (["stop", "ghost", "--json"], ["rm", "ghost", "--json"],
                 ["health", "ghost", "--json"]):
        result = run(pard.socket_path, app, *args)
        assert result.exit_code == 4, args
        assert json.loads(result.output)["error"]["code"] == "not_found"


def test_api_error_exits_1_with_its_message(pard: FakePard, app: App) -> None:
    pard.on("POST", "/deploy", (409, error("conflict", "deploymentId x exists with another body",
                                           "deploymentId")))
    result = run(pard.socket_path, app, "deploy", "https://x.test/a.apkg", "--id", "a",
                 "--version", "1")
    assert result.exit_code == 1
    assert result.stderr == "parctl: deploymentId x exists with another body\n"


def test_pard_not_running_exits_69_with_one_line(sockdir: Path, app: App) -> None:
    sock = sockdir / "par.sock"
    for args in (["list"], ["status", "hello"], ["venv", "list"], ["deploy", "https://x/a", "--id",
                                                                     "a", "--version", "1"]):
        result = run(sock, app, *args)
        assert result.exit_code == 69, args
        assert result.stderr == (f"parctl: pard is not running (no socket at {sock}): "
                                 "start it with `systemctl start par`\n")
        assert result.output == ""


def test_unexpected_error_is_one_line_without_traceback(pard: FakePard, app: App,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(_self: object, **_kw: object) -> dict:
        raise RuntimeError("boom")

    monkeypatch.setattr(Client, "agents", boom)
    monkeypatch.delenv("PARCTL_DEBUG", raising=False)
    result = run(pard.socket_path, app, "list")
    assert result.exit_code == 1
    assert result.stderr == ("parctl: unexpected error: RuntimeError: boom "
                             "(PARCTL_DEBUG=1 shows the traceback)\n")

    monkeypatch.setenv("PARCTL_DEBUG", "1")
    result = run(pard.socket_path, app, "list")
    assert result.exit_code == 1
    assert result.stderr.startswith("Traceback") and "RuntimeError: boom" in result.stderr


# -- logs, venvs, installer, pack -----------------------------------------------------


def test_logs_execs_journalctl_with_the_flags(app: App, sockdir: Path) -> None:
    calls: list[tuple[str, list[str]]] = []
    app.execvp = lambda file, argv: calls.append((file, list(argv)))
    result = run(sockdir / "absent.sock", app, "logs", "hello", "-f", "-n", "50",
                 "--since", "1 hour ago")
    assert result.exit_code == 0, result.stderr  # no pard needed
    assert calls == [("journalctl", ["journalctl", "-u", "par-agent@hello.service", "-f",
                                     "-n", "50", "--since", "1 hour ago"])]

    calls.clear()
    assert run(sockdir / "absent.sock", app, "logs", "hello").exit_code == 0
    assert calls == [("journalctl", ["journalctl", "-u", "par-agent@hello.service"])]

    result = run(sockdir / "absent.sock", app, "logs", "x;rm -rf /")
    assert result.exit_code == 2 and len(calls) == 1

    calls.clear()  # not an agent id: a deploymentId, even without pard
    assert run(sockdir / "absent.sock", app, "logs", "Deploy-7").exit_code == 0
    assert calls == [("journalctl", ["journalctl", "PAR_DEPLOYMENT_ID=Deploy-7"])]


def test_logs_of_a_deployment_id_pard_knows(pard: FakePard, app: App) -> None:
    calls: list[tuple[str, list[str]]] = []
    app.execvp = lambda file, argv: calls.append((file, list(argv)))
    # agent-id-shaped, but pard says it is a deployment of agent "hello"
    pard.on("GET", "/deployments/hello-3f2a", (200, record(deployment_id="hello-3f2a")))
    assert run(pard.socket_path, app, "logs", "hello-3f2a", "-n", "5").exit_code == 0
    assert calls == [("journalctl", ["journalctl", "PAR_DEPLOYMENT_ID=hello-3f2a", "-n", "5"])]


def test_token_create_writes_a_root_only_file_once(app: App, tmp_path: Path,
                                                   sockdir: Path) -> None:
    token_file = tmp_path / "etc" / "token"
    assert app.config_path is not None
    with open(app.config_path, "a") as fh:
        fh.write(f"listen:\n  token_file: {token_file}\n")
    result = run(sockdir / "absent.sock", app, "token", "create")  # no pard needed
    assert result.exit_code == 0, result.stderr
    value = result.output.strip()
    assert len(value) >= 40 and token_file.read_text() == value + "\n"
    assert token_file.stat().st_mode & 0o777 == 0o600
    again = run(sockdir / "absent.sock", app, "token", "create")
    assert again.exit_code == 1 and "--force" in again.stderr
    assert token_file.read_text() == value + "\n"
    forced = run(sockdir / "absent.sock", app, "token", "create", "--force")
    assert forced.exit_code == 0 and forced.output.strip() != value


def test_env_set_follows_the_replacement_and_never_prints_values(pard: FakePard,
                                                                 app: App) -> None:
    seen: list[dict] = []

    def accept(req: Seen, _match: object) -> tuple[int, dict]:
        seen.append(req.body if isinstance(req.body, dict) else json.loads(req.body))
        return 202, {"status": "accepted", "deploymentId": "hello-env-1"}

    pard.on("POST", "/deployments/hello/env", accept)
    pard.on("GET", "/deployments/hello-env-1", (200, record(deployment_id="hello-env-1")))
    result = run(pard.socket_path, app, "env", "set", "hello", "API_KEY=s3cret", "MODE=x")
    assert result.exit_code == 0, result.stderr
    assert seen == [{"set": {"API_KEY": "s3cret", "MODE": "x"}, "unset": [], "restart": True}]
    assert "s3cret" not in result.output + result.stderr
    assert "hello-env-1" in result.output

    seen.clear()
    pard.on("POST", "/deployments/hello/env", accept)
    result = run(pard.socket_path, app, "env", "unset", "hello", "MODE", "--no-restart")
    assert result.exit_code == 0 and seen[0]["unset"] == ["MODE"]
    assert seen[0]["restart"] is False
    assert run(pard.socket_path, app, "env", "set", "hello", "1BAD=x").exit_code == 2


def test_env_list_shows_names(pard: FakePard, app: App) -> None:
    pard.on("GET", "/deployments/hello/env", (200, {"deploymentId": "hello-d1",
                                                     "names": ["API_KEY", "MODE"]}))
    result = run(pard.socket_path, app, "env", "list", "hello")
    assert result.exit_code == 0 and result.output.split() == ["API_KEY", "MODE"]


def test_parctl_without_a_command_is_a_usage_error(app: App, sockdir: Path) -> None:
    result = run(sockdir / "absent.sock", app)
    assert result.exit_code == 2 and "Missing command" in result.stderr


def test_rm_twice_says_already_removed(pard: FakePard, app: App) -> None:
    pard.on("DELETE", "/deployments/hello", (200, {"deleted": "d-1", "agentAppId": "hello",
                                                    "purged": [], "alreadyRemoved": True}))
    result = run(pard.socket_path, app, "rm", "hello")
    assert result.exit_code == 0
    assert result.output.splitlines()[0] == "already removed hello (deployment d-1)"


def test_venv_commands(pard: FakePard, app: App, tmp_path: Path) -> None:
    pard.on("GET", "/venvs", (200, {"venvs": [
        {"name": "hello_1a2b3c4", "sizeBytes": 33 * 1024**2, "lastUsed": None,
         "inUseBy": ["hello"], "layer": "0123456789abcdef", "layerShared": 2},
        {"name": "other_7654321", "sizeBytes": 1024**2, "lastUsed": None, "inUseBy": [],
         "layer": "fedcba9876543210", "layerShared": 1}]}))
    pard.on("POST", "/venvs/prune", (200, {"evicted": ["old_7654321"]}))
    pard.on("POST", "/venvs/prewarm", (200, {"seconds": 1.25}))
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("requests==2.28.1\n")

    result = run(pard.socket_path, app, "venv", "list")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[1].split() == ["hello_1a2b3c4", "33.0", "MiB", "shared", "by", "2", "-", "hello"]
    assert lines[2].split() == ["other_7654321", "1.0", "MiB", "own", "-", "-"]
    assert "counted once on disk" in lines[-1]
    assert json.loads(run(pard.socket_path, app, "venv", "list", "--json").output)["venvs"][0][
        "inUseBy"] == ["hello"]

    result = run(pard.socket_path, app, "venv", "prune")
    assert result.output == "evicted 1 venv\n  old_7654321\n"

    result = run(pard.socket_path, app, "venv", "prewarm", "-r", str(requirements), "--json")
    assert json.loads(result.output) == {"seconds": 1.25}
    assert pard.requests[-1].body == {"requirements": "requests==2.28.1\n"}

    assert run(pard.socket_path, app, "venv", "prewarm").exit_code == 2  # -r is required


def test_installer_install_uv(pard: FakePard, app: App) -> None:
    pard.on("POST", "/installer/install-uv", (200, {"path": "/var/lib/pixell-runtime/tools/uv",
                                                    "version": "0.4.30"}))
    result = run(pard.socket_path, app, "installer", "install-uv")
    assert result.output == "uv 0.4.30 installed at /var/lib/pixell-runtime/tools/uv\n"


def test_pack_writes_an_apkg_without_pard(app: App, tmp_path: Path, sockdir: Path) -> None:
    pytest.importorskip("par.pack", reason="par.pack (pack_folder) is not written yet")
    folder = make_agent(tmp_path, "name: hello\nversion: '1.0.0'\n")
    out = tmp_path / "out.apkg"
    result = run(sockdir / "absent.sock", app, "pack", str(folder), "-o", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.output)
    assert Path(data["path"]).resolve() == out.resolve() and zipfile.is_zipfile(out)
    assert data["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


# -- doctor, version -----------------------------------------------------------------


def test_doctor_with_pard_down_fails(app: App, sockdir: Path) -> None:
    result = run(sockdir / "absent.sock", app, "doctor")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    pard_line = next(line for line in lines if line.split()[1] == "pard:")
    assert pard_line.startswith("fail  pard: pard is not running")
    assert pard_line.endswith("-> systemctl start par")
    assert all(re.match(r"^(ok  |warn|fail)  [a-z ]+: ", line) for line in lines), lines
    assert any(line.startswith("ok    state dir:") for line in lines)

    data = json.loads(run(sockdir / "absent.sock", app, "doctor", "--json").output)
    assert data["ok"] is False
    assert {c["check"] for c in data["checks"]} >= {"systemd", "pard", "config", "state dir",
                                                     "cache dir", "installer", "disk", "python"}


def test_doctor_with_pard_up_reports_it_and_its_installer(pard: FakePard, app: App) -> None:
    pard.on("GET", "/health", (200, daemon_health()))
    result = run(pard.socket_path, app, "doctor")
    lines = result.output.splitlines()
    assert any(line.startswith("ok    pard: version 0.1.0, answering on") for line in lines), lines
    assert ("ok    installer: uv 0.4.30 (/var/lib/pixell-runtime/tools/uv) (reported by pard)"
            in lines)
    assert any(line.startswith("ok    python: /usr/bin/python3 is Python 3.") for line in lines)


def test_doctor_flags_a_world_writable_state_dir(app: App, sockdir: Path) -> None:
    state = app.config().paths.state_dir
    state.chmod(0o777)
    result = run(sockdir / "absent.sock", app, "doctor")
    expected = f"fail  state dir: {state} is world-writable (0777) -> chmod o-w {state}"
    assert expected in result.output.splitlines()


def test_version_with_and_without_pard(pard: FakePard, app: App, sockdir: Path) -> None:
    pard.on("GET", "/health", (200, daemon_health()))
    # parctl's own version, then the one the (fake) pard reports
    assert run(pard.socket_path, app, "version").output == f"parctl {__version__}\npard 0.1.0\n"
    result = run(sockdir / "absent.sock", app, "version", "--json")
    assert result.exit_code == 0
    assert json.loads(result.output) == {"parctl": __version__, "pard": None}


# -- the real process --------------------------------------------------------------------


def parctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "par.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=30, env={**os.environ, **(env or {})})


def test_process_exit_codes(pard: FakePard, sockdir: Path) -> None:
    missing = sockdir / "nothing.sock"

    proc = parctl("list", env={"PARCTL_SOCKET": str(missing)})
    assert proc.returncode == 69
    assert proc.stderr == (f"parctl: pard is not running (no socket at {missing}): "
                           "start it with `systemctl start par`\n")
    assert proc.stdout == ""

    proc = parctl("--socket", str(pard.socket_path), "health", "ghost")
    assert (proc.returncode, proc.stderr) == (
        4, "parctl: no agent or deployment named 'ghost' (parctl list shows the agents)\n")

    assert parctl("no-such-command").returncode == 2


def test_shell_completion_script() -> None:
    proc = parctl(env={"_PARCTL_COMPLETE": "bash_source"})
    assert proc.returncode == 0
    assert "_parctl_completion" in proc.stdout and "_PARCTL_COMPLETE=bash_complete" in proc.stdout


@pytest.mark.parametrize(("record", "url"), [
    ({"ports": {"rest": 8100}}, "http://127.0.0.1:8100/health"),  # a pard before 0.2
    ({"ports": {"rest": 8100}, "address": "127.31.164.1"}, "http://127.31.164.1:8100/health"),
    ({"ports": {"rest": 8100}, "address": "::1"}, "http://[::1]:8100/health"),
    ({"ports": {}}, None),
])
def test_health_url_is_where_the_host_reaches_the_agent(record: dict, url: str | None) -> None:
    from par.cli.render import health_url

    assert health_url(record) == url
