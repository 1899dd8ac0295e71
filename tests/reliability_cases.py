"""The reliability tables (bad input, faults, load, security) and what they are checked with.

Each reliability test module (tests/integration/test_reliability_*.py) holds a
`TABLE`: every case has a stable id, what is done and what PAR must do.  A case
is proven by one test, named by `Case.test`, or by default `test_<id with _>` in
the table's module, or, for a parametrized test, `<function>[<id>]`.  Cases the
issue asks for that older modules already prove (kill -9 per phase, reboot, ...)
are rows whose `test` names that test, so the tables list everything in one place.

`scripts/reliability-doc` runs every test the tables name with `--junitxml` and
writes docs/reliability.md from the tables plus those results
(`render_markdown`); tests/unit/test_reliability_doc.py checks that the document
lists every case, so neither can drift from the other.

The second half of this file holds the helpers the integration modules share
(raw API requests, snapshots of PAR's folders, a resident agent, an HTTP server
for package URLs, measurements that end up in the document).
"""

from __future__ import annotations

import http.client
import importlib
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from par.client import UnixHTTPConnection

REPO = Path(__file__).resolve().parent.parent
DOC_PATH = REPO / "docs" / "reliability.md"
# The modules holding a TABLE, in the order the document shows them.
TABLE_MODULES = (
    "tests.integration.test_reliability_bad_input",
    "tests.integration.test_reliability_faults",
    "tests.integration.test_reliability_load",
    "tests.integration.test_reliability_security",
    "tests.integration.test_bounded_inputs",
    "tests.integration.test_reliability_front_door",
)
# kebab-case; upper case allowed where an id names an API field (missing-deploymentId)
CASE_ID_RE = re.compile(r"^[a-z0-9][A-Za-z0-9-]*$")
MEASURE_PREFIX = "[reliability] "


# ---------------------------------------------------------------- the tables


@dataclass(frozen=True)
class Case:
    """One row: `what` is done to PAR, `expected` is what PAR must do.

    test: the pytest node proving it, relative to the repo
    ("tests/integration/test_pard.py::test_kill9_while_downloading"); None
    means `test_<id with _>` in the table's own module.
    """

    id: str
    what: str
    expected: str
    test: str | None = None


@dataclass(frozen=True)
class Table:
    """One table of docs/reliability.md."""

    key: str
    title: str
    intro: str
    module: str  # dotted name of the module holding the table
    cases: tuple[Case, ...]

    @property
    def module_file(self) -> str:
        return self.module.replace(".", "/") + ".py"

    def node_of(self, case: Case) -> str:
        """The pytest node id (relative to the repo) that proves `case`."""
        if case.test:
            return case.test
        return f"{self.module_file}::test_{case.id.replace('-', '_')}"


def param_node(module: str, function: str, case_id: str) -> str:
    """The node id of a parametrized test's case (`Case.test` of table-driven rows)."""
    return f"{module.replace('.', '/')}.py::{function}[{case_id}]"


def load_tables() -> list[Table]:
    """Every module's TABLE, in document order."""
    return [importlib.import_module(name).TABLE for name in TABLE_MODULES]


def check_tables(tables: list[Table]) -> list[str]:
    """Problems with the tables themselves: bad or repeated ids, empty text."""
    problems = []
    seen: set[str] = set()
    for table in tables:
        for case in table.cases:
            if not CASE_ID_RE.fullmatch(case.id):
                problems.append(f"{table.key}: case id {case.id!r} does not match "
                                f"{CASE_ID_RE.pattern}")
            if case.id in seen:
                problems.append(f"{table.key}: case id {case.id!r} appears twice")
            seen.add(case.id)
            if not case.what.strip() or not case.expected.strip():
                problems.append(f"{table.key}: case {case.id!r} has no what/expected text")
    return problems


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Result:
    """The outcome of one pytest node in a junit XML file."""

    outcome: str  # passed | failed | skipped
    seconds: float
    detail: str = ""  # skip reason or failure message (first line)
    measures: tuple[tuple[str, str], ...] = ()


def _node_id(classname: str, name: str) -> str:
    """pytest's junit `classname` ("tests.integration.test_x", or "...test_x.Class") and
    `name` → the node id."""
    parts = classname.split(".")
    # a class inside the module starts with an upper-case letter
    while parts and parts[-1][:1].isupper():
        name = f"{parts.pop()}::{name}"
    return "/".join(parts) + ".py::" + name


def parse_junit(path: Path) -> dict[str, Result]:
    """Node id → Result for every test case in a pytest junit XML file."""
    out: dict[str, Result] = {}
    root = ET.parse(path).getroot()
    for tc in root.iter("testcase"):
        node = _node_id(tc.get("classname", ""), tc.get("name", ""))
        outcome, detail = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                detail = (child.get("message") or "").strip()
            elif child.tag == "skipped":
                outcome = "skipped"
                detail = (child.get("message") or "").strip()
        measures = []
        for captured in tc.iter("system-out"):
            for line in (captured.text or "").splitlines():
                if line.startswith(MEASURE_PREFIX):
                    key, _, value = line[len(MEASURE_PREFIX):].partition(": ")
                    measures.append((key.strip(), value.strip()))
        result = Result(outcome, float(tc.get("time") or 0.0),
                        detail.splitlines()[0] if detail else "", tuple(measures))
        previous = out.get(node)
        if previous is not None:
            # pytest writes a second entry for an error in teardown: a failure wins
            worst = "failed" if "failed" in (previous.outcome, outcome) else previous.outcome
            result = Result(worst, previous.seconds + result.seconds,
                            previous.detail or result.detail, previous.measures + result.measures)
        out[node] = result
    return out


# ---------------------------------------------------------------- the document


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _result_cell(result: Result | None) -> str:
    if result is None:
        return "not run"
    if result.outcome == "passed":
        return f"pass ({result.seconds:.1f} s)"
    if result.outcome == "skipped":
        return f"skipped: {_cell(result.detail.removeprefix('Skipped: '))}"
    return f"**FAIL**: {_cell(result.detail[:160])}"


def render_markdown(tables: list[Table], results: dict[str, Result], run_info: str) -> str:
    """docs/reliability.md: one table per module (case, what, expected, result) and measurements."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "not run": 0}
    for table in tables:
        for case in table.cases:
            r = results.get(table.node_of(case))
            counts[r.outcome if r else "not run"] += 1
    total = sum(counts.values())
    lines = [
        "# Reliability and security: bad input, faults, load",
        "",
        "<!-- Generated by scripts/reliability-doc from the tables in "
        "tests/integration/test_reliability_*.py and the results of one run; do not edit. -->",
        "",
        "What PAR does when it is fed bad input, when things break under it, under load, and",
        "against whom it is closed. Every row is one test; the tables live in the test modules",
        "(`TABLE`), this page is generated from them and from the results of a real run",
        "(`scripts/reliability-doc`), and `tests/unit/test_reliability_doc.py` fails when a",
        "case of the tables is missing here.",
        "",
        f"Run: {run_info}",
        "",
        f"**{total} cases: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['skipped']} skipped, {counts['not run']} not run.**",
        "",
        "Reproduce: `scripts/reliability-doc` (boots the systemd sandbox when PID 1 is not",
        "systemd), or one table: `pytest tests/integration/test_reliability_<table>.py` inside it.",
    ]
    for table in tables:
        lines += ["", f"## {table.title}", "", table.intro.strip(), "",
                  f"Tests: `{table.module_file}`", "",
                  "| case | what | expected | result |", "|---|---|---|---|"]
        measures: list[tuple[str, str]] = []
        for case in table.cases:
            node = table.node_of(case)
            result = results.get(node)
            where = "" if node.startswith(table.module_file) else \
                f" <br>*({node.split('/')[-1]})*"
            lines.append(f"| `{case.id}` | {_cell(case.what)}{where} | {_cell(case.expected)} | "
                         f"{_result_cell(result)} |")
            if result:
                measures += [m for m in result.measures if m not in measures]
        if measures:
            lines += ["", "Measured in this run:", ""]
            lines += [f"- {key}: {value}" for key, value in measures]
    return "\n".join(lines) + "\n"


def documented_case_ids(text: str) -> set[str]:
    """The case ids a rendered document lists (first column of its tables)."""
    return set(re.findall(r"^\| `([a-z0-9][A-Za-z0-9-]*)` \|", text, flags=re.M))


# ---------------------------------------------------------------- helpers for the tests


def measure(name: str, value: object) -> None:
    """Print a measurement; scripts/reliability-doc copies it into the document (from the
    junit system-out)."""
    print(f"{MEASURE_PREFIX}{name}: {value}", flush=True)


@dataclass(frozen=True)
class Answer:
    """An HTTP answer from pard: status and decoded JSON body ({} when not JSON)."""

    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def error(self) -> dict:
        err = self.body.get("error")
        return err if isinstance(err, dict) else {}


def _decode(data: bytes) -> dict:
    try:
        value = json.loads(data or b"{}")
    except ValueError:
        return {"_raw": data[:500].decode("utf-8", "replace")}
    return value if isinstance(value, dict) else {"_json": value}


def raw_request(method: str, path: str, body: bytes | None = None, *,
                headers: dict[str, str] | None = None,
                socket_path: Path = Path("/run/par/par.sock"),
                tcp: str | None = None, token: str | None = None,
                timeout: float = 30.0) -> Answer:
    """Send exactly `body` (bytes, not re-encoded) to pard over the unix socket, or over
    TCP ("host:port") with `Authorization: Bearer <token>` when a token is given."""
    send = {"Content-Type": "application/json", **(headers or {})}
    if tcp is not None:
        host, _, port = tcp.rpartition(":")
        conn: http.client.HTTPConnection = http.client.HTTPConnection(host, int(port),
                                                                      timeout=timeout)
        if token is not None:
            send["Authorization"] = f"Bearer {token}"
    else:
        conn = UnixHTTPConnection(socket_path, timeout)
    try:
        conn.request(method, path, body=body, headers=send)
        resp = conn.getresponse()
        data = resp.read()
        return Answer(resp.status, _decode(data), {k.lower(): v for k, v in resp.getheaders()})
    finally:
        conn.close()


def json_body(value: object) -> bytes:
    return json.dumps(value).encode()


def state_listing(state_dir: Path) -> dict[str, list[str]]:
    """Names in packages/, extracted/, venvs/ and env/ (agents' environment files); the
    venv lock folder is not content."""
    out = {}
    for folder in ("packages", "extracted", "venvs", "env"):
        path = state_dir / folder
        names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        out[folder] = [n for n in names if n != ".locks"]
    return out


def agent_units() -> list[str]:
    """Every loaded par-agent@ unit (any state)."""
    res = subprocess.run(["systemctl", "list-units", "--all", "--plain", "--no-legend",
                          "par-agent@*"], capture_output=True, text=True, timeout=30)
    # the first word ending in .service: failed units get a "●" before it
    return sorted(next(w for w in line.split() if w.endswith(".service"))
                  for line in res.stdout.splitlines() if ".service" in line)


@dataclass(frozen=True)
class Snapshot:
    """What must not change when a request is refused: files in PAR's folders and the units."""

    files: dict[str, list[str]]
    units: list[str]

    @classmethod
    def take(cls, state_dir: Path) -> Snapshot:
        return cls(state_listing(state_dir), agent_units())

    def assert_same(self, state_dir: Path, timeout: float = 10.0) -> None:
        """Equal now, or within `timeout` (systemd unloads a reset unit a moment later)."""
        deadline = time.monotonic() + timeout
        while True:
            now = Snapshot.take(state_dir)
            if now == self:
                return
            if time.monotonic() > deadline:
                added = {k: sorted(set(now.files[k]) - set(self.files[k])) for k in now.files}
                raise AssertionError(f"left behind: files {added}, units "
                                     f"{sorted(set(now.units) - set(self.units))}; gone: "
                                     f"units {sorted(set(self.units) - set(now.units))}")
            time.sleep(0.1)


def main_pid(unit: str) -> int:
    out = subprocess.run(["systemctl", "show", "-P", "MainPID", unit], capture_output=True,
                         text=True, timeout=30).stdout.strip()
    return int(out or 0)


def http_get(port: int, path: str = "/health", timeout: float = 5.0) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path → (status, body); (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@dataclass(frozen=True)
class Resident:
    """An agent that is running before a case and must be running, untouched, after it."""

    agent_id: str
    deployment_id: str
    pid: int
    port: int

    @property
    def unit(self) -> str:
        return f"par-agent@{self.agent_id}.service"

    def assert_untouched(self) -> None:
        assert main_pid(self.unit) == self.pid, f"{self.unit} was restarted or stopped"
        status, body = http_get(self.port)
        assert status == 200 and json.loads(body)["ok"] is True, (status, body)


def wait_status(client, deployment_id: str, statuses: tuple[str, ...] = ("healthy", "failed"),
                timeout: float = 120.0) -> dict:
    """Poll GET /deployments/{id} until its status is one of `statuses`; return the record."""
    deadline = time.monotonic() + timeout
    while True:
        d = client.deployment(deployment_id)
        if d["status"] in statuses:
            return d
        if time.monotonic() > deadline:
            raise AssertionError(f"{deployment_id} still {d['status']} after {timeout} s: {d}")
        time.sleep(0.1)




def journal_since(unit: str, cursor: str | None = None) -> tuple[str, str]:
    """(text, new cursor) of `unit`'s journal after `cursor` (all of it when None)."""
    argv = ["journalctl", "-u", unit, "--no-pager", "-o", "cat", "--show-cursor"]
    if cursor:
        argv += ["--after-cursor", cursor]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    text, _, tail = out.rpartition("-- cursor: ")
    if not text and not tail.startswith("s="):
        return out, cursor or ""
    return text, tail.strip() or (cursor or "")


def retry_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1) -> object:
    """Poll `predicate` until truthy (returned) or raise AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
        time.sleep(interval)


