"""The front door's rows of docs/reliability.md: bad input and changes under load.

The tests are in test_front_door.py (one pard and one agent for them all); this
module holds only the table, so the reliability page lists them with the others.
"""

from __future__ import annotations

from tests.reliability_cases import Case, Table, param_node

FRONT = "tests/integration/test_front_door.py"
_PATHS = "test_paths_that_try_to_leave_their_agent_are_400"
_PATH_TEXT = {
    "dotdot": "`/agents/<a>/../<b>/...`",
    "encoded-dotdot": "`/agents/<a>/%2e%2e/<b>/...`",
    "encoded-slash": "`/agents/<a>/api%2F..%2Fping`",
    "encoded-backslash": "`/agents/<a>/api/%5c..%5cping`",
    "into-pard": "`/agents/..%2Fpar.sock/health` (toward pard's socket)",
    "encoded-name": "`/agents/%66d-echo/...` (a percent-encoded agent name)",
}


def _zero_refused(case_id: str, change: str, test: str) -> Case:
    return Case(case_id, f"8 keep-alive clients through the front door for 20 s during "
                f"{change}", "every request gets the agent's answer: zero connection "
                "errors, zero 5xx; the longest wait is printed", f"{FRONT}::{test}")


TABLE = Table(
    key="front-door",
    title="Front door",
    intro="Requests to `/agents/{id}/...` on the front door (`par-front.service`, its "
          "socket held by `par-front.socket`) in the systemd sandbox, with one agent (an "
          "echo and SSE agent) behind it. Bad input must get a clear 4xx with a JSON body "
          "and leave other agents untouched; changes to the agent or to the front door must "
          "refuse no request.",
    module=__name__,
    cases=(
        Case("front-unknown-agent", "`/agents/fd-nobody/...`, and a path outside `/agents/`",
             "404 JSON `agent_not_found` / `not_found`",
             f"{FRONT}::test_unknown_agent_is_json_404"),
        Case("front-stopped-agent", "a request to a stopped agent",
             "503 JSON `agent_unavailable` with `Retry-After` and the agent's status; "
             "the other agent answers",
             f"{FRONT}::test_stopped_agent_is_json_503_with_retry_after"),
        *(Case(f"front-path-{pid}", f"{text}: a path trying to leave its agent",
               "400 JSON `bad_path`; nothing reaches another agent or pard",
               param_node("tests.integration.test_front_door", _PATHS, pid))
          for pid, text in _PATH_TEXT.items()),
        Case("front-oversized", "a 20 KB header; a body of 1 MiB + 1 byte, plain and chunked",
             "400; 413 JSON `body_too_large` (front.max_body_bytes), also when chunked",
             f"{FRONT}::test_oversized_headers_and_bodies_are_4xx"),
        Case("front-slow-client", "a client that sends half its headers, one that stops "
             "sending its body", "408 within front's header/body timeouts; other requests "
             "answered meanwhile", f"{FRONT}::test_slow_clients_time_out_and_others_are_untouched"),
        Case("front-upgrade-not-websocket", "a WebSocket upgrade to a route of an agent that "
             "does not speak WebSocket; an `Upgrade: h2c`", "4xx JSON `not_websocket`; 400 "
             "`upgrade_refused`",
             f"{FRONT}::test_websocket_upgrade_to_an_agent_without_websocket_is_4xx"),
        _zero_refused("front-zero-refused-redeploy", "a redeploy with a new version",
                      "test_zero_refused_across_a_redeploy"),
        _zero_refused("front-zero-refused-restart", "`parctl restart`",
                      "test_zero_refused_across_parctl_restart"),
        _zero_refused("front-zero-refused-sigkill", "SIGKILL of the agent's main process",
                      "test_zero_refused_across_sigkill_of_the_agent"),
        _zero_refused("front-zero-refused-failed-redeploy",
                      "a redeploy whose new version fails to start (the old one keeps serving)",
                      "test_zero_refused_across_a_failed_redeploy"),
        _zero_refused("front-zero-refused-own-restart", "a restart of the front door itself",
                      "test_zero_refused_across_a_restart_of_the_front_door"),
    ),
)
