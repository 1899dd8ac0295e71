"""par.deploy_request: every rule of docs/api.md "Deploy request rules"."""

from __future__ import annotations

import copy

import pytest

from par.deploy_request import DeployRequest, parse_deploy_request
from par.errors import ParError

SHA = "ab" * 32


def base_request() -> dict:
    """A valid request with every optional field set."""
    return {
        "deploymentId": "d-1",
        "agentAppId": "hello",
        "orgId": "org-1",
        "version": "1.0.0",
        "packageUrl": "https://packages.example.com/hello-1.0.0.apkg",
        "packageSha256": SHA,
        "forceRefresh": False,
        "cpuUnits": 512,
        "memoryMB": 256,
        "stopTimeoutSec": 20,
        "surfaces": {"ports": {"rest": 8100, "a2a": 50100}},
        "env": {"API_KEY": "s3cret-value", "MODE": "prod"},
    }


def minimal_request() -> dict:
    body = base_request()
    for key in ("packageSha256", "forceRefresh", "cpuUnits", "memoryMB", "stopTimeoutSec",
                "surfaces", "env"):
        del body[key]
    return body


def parse(body: object, local: bool = False, key: str | None = None) -> DeployRequest:
    return parse_deploy_request(body, local=local, idempotency_key=key)


DELETE = object()  # marks "remove this field" in the table below


def mutate(path: str, value: object) -> dict:
    """base_request() with the dotted `path` set to `value` (or removed for DELETE)."""
    body = base_request()
    *parents, last = path.split(".")
    target = body
    for part in parents:
        target = target[part]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return body


# (field path, value, status, code, field named in the error)
BAD_CASES: list[tuple[str, object, int, str, str]] = [
    ("deploymentId", DELETE, 400, "missing_field", "deploymentId"),
    ("deploymentId", None, 400, "missing_field", "deploymentId"),
    ("deploymentId", 12, 400, "invalid_id", "deploymentId"),
    ("agentAppId", DELETE, 400, "missing_field", "agentAppId"),
    ("agentAppId", ["hello"], 400, "invalid_id", "agentAppId"),
    ("agentAppId", "Hello", 400, "invalid_id", "agentAppId"),
    ("orgId", DELETE, 400, "missing_field", "orgId"),
    ("orgId", 7, 400, "invalid_field", "orgId"),
    ("orgId", "org\nX-Injected: 1", 400, "invalid_field", "orgId"),
    ("orgId", "o" * 257, 400, "invalid_field", "orgId"),
    ("version", DELETE, 400, "missing_field", "version"),
    ("version", 1.0, 400, "invalid_id", "version"),
    ("version", "1.0/../x", 400, "invalid_id", "version"),
    ("packageUrl", DELETE, 400, "missing_field", "packageUrl"),
    ("packageUrl", 5, 400, "invalid_field", "packageUrl"),
    ("packageUrl", "", 400, "invalid_field", "packageUrl"),
    ("packageUrl", "ftp://example.com/x.apkg", 400, "invalid_field", "packageUrl"),
    ("packageUrl", "https://", 400, "invalid_field", "packageUrl"),
    ("packageUrl", "hello.apkg", 400, "invalid_field", "packageUrl"),
    ("packageUrl", " https://example.com/x.apkg", 400, "invalid_field", "packageUrl"),
    ("packageUrl", "https://example.com:99999/x", 400, "invalid_field", "packageUrl"),
    ("packageUrl", "https://example.com/" + "a" * 9000, 400, "invalid_field", "packageUrl"),
    ("packageUrl", {}, 400, "missing_field", "packageUrl.signedUrl"),
    ("packageUrl", {"signedUrl": 3}, 400, "invalid_field", "packageUrl.signedUrl"),
    ("packageUrl", {"signedUrl": "gopher://x/y"}, 400, "invalid_field", "packageUrl.signedUrl"),
    ("packageUrl", "file:///srv/hello.apkg", 403, "local_only", "packageUrl"),
    ("packageUrl", "FILE:///srv/hello.apkg", 403, "local_only", "packageUrl"),
    ("packageUrl", "file:hello.apkg", 403, "local_only", "packageUrl"),
    ("packageUrl", "/srv/hello.apkg", 403, "local_only", "packageUrl"),
    ("packageUrl", {"signedUrl": "file:///srv/x.apkg"}, 403, "local_only", "packageUrl.signedUrl"),
    ("packageSha256", "abc", 400, "invalid_field", "packageSha256"),
    ("packageSha256", "g" * 64, 400, "invalid_field", "packageSha256"),
    ("packageSha256", 123, 400, "invalid_field", "packageSha256"),
    ("forceRefresh", "yes", 400, "invalid_field", "forceRefresh"),
    ("forceRefresh", 1, 400, "invalid_field", "forceRefresh"),
    ("cpuUnits", "1024", 400, "invalid_field", "cpuUnits"),
    ("cpuUnits", 0, 400, "invalid_field", "cpuUnits"),
    ("cpuUnits", 65537, 400, "invalid_field", "cpuUnits"),
    ("cpuUnits", True, 400, "invalid_field", "cpuUnits"),
    ("cpuUnits", 1024.0, 400, "invalid_field", "cpuUnits"),
    ("memoryMB", "256", 400, "invalid_field", "memoryMB"),
    ("memoryMB", 15, 400, "invalid_field", "memoryMB"),
    ("memoryMB", 1048577, 400, "invalid_field", "memoryMB"),
    ("stopTimeoutSec", 0, 400, "invalid_field", "stopTimeoutSec"),
    ("stopTimeoutSec", 3601, 400, "invalid_field", "stopTimeoutSec"),
    ("stopTimeoutSec", "30", 400, "invalid_field", "stopTimeoutSec"),
    ("surfaces", [], 400, "invalid_field", "surfaces"),
    ("surfaces.ports", "8100", 400, "invalid_field", "surfaces.ports"),
    ("surfaces.ports.rest", 80, 400, "invalid_field", "surfaces.ports.rest"),
    ("surfaces.ports.rest", 65536, 400, "invalid_field", "surfaces.ports.rest"),
    ("surfaces.ports.a2a", "50100", 400, "invalid_field", "surfaces.ports.a2a"),
    ("surfaces.ports.ui", False, 400, "invalid_field", "surfaces.ports.ui"),
    ("surfaces.ports.REST", 8200, 400, "invalid_field", "surfaces.ports.REST"),
    ("surfaces.ports.a2a", 8100, 400, "invalid_field", "surfaces.ports"),
    ("env", ["A=1"], 400, "invalid_field", "env"),
    ("env", "A=1", 400, "invalid_field", "env"),
    ("env.1BAD", "x", 400, "invalid_field", "env"),
    ("env.BAD-KEY", "x", 400, "invalid_field", "env"),
    ("env.LD PRELOAD", "x", 400, "invalid_field", "env"),
    ("env.PORT", 8080, 400, "invalid_field", "env.PORT"),
    ("env.NULL", None, 400, "invalid_field", "env.NULL"),
    ("env.NUL", "a\x00b", 400, "invalid_field", "env.NUL"),
]

INJECTION_IDS = ["../x", "a/b", "x.service", "a;b", "a" * 300, "", "héllo", "a@b", "a\\b",
                 "a b", "-x", "x\n"]


@pytest.mark.parametrize(
    ("path", "value", "status", "code", "field"), BAD_CASES,
    ids=[f"{c[0]}={c[1]!r:.30}" for c in BAD_CASES],
)
def test_bad_field(path: str, value: object, status: int, code: str, field: str) -> None:
    with pytest.raises(ParError) as info:
        parse(mutate(path, value))
    err = info.value
    assert (err.status, err.code, err.field) == (status, code, field)
    assert err.message


@pytest.mark.parametrize("name", ["deploymentId", "agentAppId"])
@pytest.mark.parametrize("bad", INJECTION_IDS)
def test_injection_ids_refused_naming_the_field(name: str, bad: str) -> None:
    with pytest.raises(ParError) as info:
        parse(mutate(name, bad), key=None)
    assert (info.value.status, info.value.code, info.value.field) == (400, "invalid_id", name)


def test_valid_request_is_normalized() -> None:
    body = base_request()
    body["packageSha256"] = SHA.upper()
    req = parse(body)
    assert (req.deployment_id, req.agent_app_id, req.org_id, req.version) == (
        "d-1", "hello", "org-1", "1.0.0")
    assert req.package_url == "https://packages.example.com/hello-1.0.0.apkg"
    assert not req.package_url_signed and not req.package_is_local
    assert req.package_sha256 == SHA
    assert (req.cpu_units, req.memory_mb, req.stop_timeout_s) == (512, 256, 20)
    assert req.ports == {"rest": 8100, "a2a": 50100}
    assert req.env == {"API_KEY": "s3cret-value", "MODE": "prod"}
    assert req.raw["packageSha256"] == SHA


def test_minimal_request_has_defaults_and_empty_org_is_allowed() -> None:
    body = minimal_request()
    body["orgId"] = ""
    req = parse(body)
    assert req.org_id == ""
    assert req.package_sha256 is None and req.force_refresh is False
    assert (req.cpu_units, req.memory_mb, req.stop_timeout_s) == (None, None, None)
    assert req.ports == {} and req.env == {}
    assert set(req.raw) == {"deploymentId", "agentAppId", "orgId", "version", "packageUrl"}


def test_nulls_in_optional_fields_count_as_absent() -> None:
    body = minimal_request()
    body.update(packageSha256=None, forceRefresh=None, cpuUnits=None, memoryMB=None,
                stopTimeoutSec=None, surfaces=None, env=None)
    req = parse(body)
    assert req.fingerprint() == parse(minimal_request()).fingerprint()
    assert set(req.raw) == {"deploymentId", "agentAppId", "orgId", "version", "packageUrl"}


def test_only_given_ports_are_kept() -> None:
    body = mutate("surfaces.ports", {"ui": 3100, "rest": None})
    assert parse(body).ports == {"ui": 3100}
    assert parse(mutate("surfaces", {"other": 1})).ports == {}


def test_unknown_fields_are_ignored_and_not_stored() -> None:
    body = base_request()
    body["callbackUrl"] = "https://cp.example.com/hook"
    body["surfaces"]["rest"] = {"enabled": True}
    req = parse(body)
    assert "callbackUrl" not in req.raw
    assert req.raw["surfaces"] == {"ports": {"rest": 8100, "a2a": 50100}}
    assert req.fingerprint() == parse(base_request()).fingerprint()


def test_signed_url_is_unwrapped_and_flagged() -> None:
    url = "https://bucket.s3.amazonaws.com/hello.apkg?X-Amz-Signature=abc&X-Amz-Expires=300"
    req = parse(mutate("packageUrl", {"signedUrl": url, "expiresAt": "later"}))
    assert req.package_url == url and req.package_url_signed
    assert req.raw["packageUrl"] == {"signedUrl": url}


@pytest.mark.parametrize("url", ["file:///srv/hello.apkg", "/srv/hello.apkg",
                                 "file://localhost/srv/hello.apkg"])
def test_local_urls_are_accepted_on_the_socket(url: str) -> None:
    req = parse(mutate("packageUrl", url), local=True)
    assert req.package_url == url and req.package_is_local


def test_file_url_must_name_an_absolute_local_path() -> None:
    for url in ("file://otherhost/srv/x.apkg", "file:x.apkg"):
        with pytest.raises(ParError) as info:
            parse(mutate("packageUrl", url), local=True)
        assert (info.value.code, info.value.field) == ("invalid_field", "packageUrl")


def test_idempotency_key() -> None:
    assert parse(base_request(), key="d-1").deployment_id == "d-1"
    assert parse(base_request(), key=None).deployment_id == "d-1"
    for key in ("d-2", "", "D-1"):
        with pytest.raises(ParError) as info:
            parse(base_request(), key=key)
        err = info.value
        assert (err.status, err.code, err.field) == (400, "idempotency_mismatch", "Idempotency-Key")


@pytest.mark.parametrize("body", [[], "x", 3, None, True])
def test_not_an_object(body: object) -> None:
    with pytest.raises(ParError) as info:
        parse(body)
    assert (info.value.status, info.value.code) == (400, "not_object")


def test_fingerprint_same_request_same_fingerprint() -> None:
    reordered = dict(reversed(list(base_request().items())))
    assert parse(reordered).fingerprint() == parse(base_request()).fingerprint()
    with_default = minimal_request() | {"forceRefresh": False, "env": {}, "surfaces": {}}
    assert parse(with_default).fingerprint() == parse(minimal_request()).fingerprint()
    upper = mutate("packageSha256", SHA.upper())
    assert parse(upper).fingerprint() == parse(base_request()).fingerprint()


@pytest.mark.parametrize(("path", "value"), [
    ("memoryMB", 512), ("version", "1.0.1"), ("env.MODE", "dev"), ("forceRefresh", True),
    ("surfaces.ports.rest", 8101), ("packageUrl", "https://packages.example.com/other.apkg"),
    ("packageUrl", "https://packages.example.com/hello-1.0.0.apkg?v=2"),
])
def test_fingerprint_differs_when_the_request_differs(path: str, value: object) -> None:
    assert parse(mutate(path, value)).fingerprint() != parse(base_request()).fingerprint()


def test_fingerprint_ignores_a_renewed_url_signature() -> None:
    first = mutate("packageUrl", {"signedUrl": "https://b.example.com/h.apkg?sig=1&exp=10"})
    retry = mutate("packageUrl", {"signedUrl": "https://b.example.com/h.apkg?sig=2&exp=20"})
    other = mutate("packageUrl", {"signedUrl": "https://b.example.com/other.apkg?sig=1"})
    assert parse(first).fingerprint() == parse(retry).fingerprint()
    assert parse(first).fingerprint() != parse(other).fingerprint()


def test_raw_reads_back_to_the_same_request() -> None:
    for body in (base_request(), minimal_request(),
                 mutate("packageUrl", {"signedUrl": "https://b.example.com/h.apkg?sig=1"})):
        req = parse(body)
        again = parse(copy.deepcopy(req.raw))
        assert again == req and again.fingerprint() == req.fingerprint()
    local = parse(mutate("packageUrl", "file:///srv/h.apkg"), local=True)
    assert parse_deploy_request(local.raw, local=True, idempotency_key=None) == local


def test_env_values_never_shown() -> None:
    req = parse(base_request())
    assert "s3cret-value" not in repr(req)
    assert req.redacted()["env"] == {"API_KEY": "***", "MODE": "***"}
    assert req.raw["env"]["API_KEY"] == "s3cret-value"  # kept for the unit, redacted on output
    with pytest.raises(ParError) as info:
        parse(mutate("env.API_KEY", ["s3cret-value"]))
    assert "s3cret-value" not in info.value.message


def test_the_table_covers_every_field() -> None:
    named = {case[0].split(".")[0] for case in BAD_CASES}
    assert named == set(base_request())
