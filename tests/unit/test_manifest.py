"""agent.yaml → Manifest: defaults, the version rule, surfaces, and errors naming the field."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from par.errors import ParError
from par.log import JsonFormatter
from par.manifest import DEFAULT_ENTRYPOINT, load_manifest, parse_dotenv, read_dotenv


def pkg(tmp_path: Path, manifest: str, files: dict[str, str] | None = None) -> Path:
    root = tmp_path / "pkg"
    root.mkdir(exist_ok=True)
    (root / "agent.yaml").write_text(manifest, encoding="utf-8")
    for name, text in (files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def bad(tmp_path: Path, manifest: str, code: str, field: str,
        files: dict[str, str] | None = None) -> ParError:
    root = pkg(tmp_path, manifest, files)
    with pytest.raises(ParError) as info:
        load_manifest(root)
    assert (info.value.code, info.value.field) == (code, field), info.value
    return info.value


def test_minimal_manifest_gets_defaults(tmp_path: Path) -> None:
    m = load_manifest(pkg(tmp_path, "name: hello\nversion: '1.2'\n"))
    assert (m.name, m.version, m.entrypoint) == ("hello", "1.2", DEFAULT_ENTRYPOINT)
    assert m.surfaces == ()
    assert (m.rest_entry, m.a2a_service, m.ui_path) == (None, None, None)
    assert m.environment == {} and m.dependencies == () and m.extra == {}
    assert m.package_id == "hello@1.2"


def test_full_manifest(tmp_path: Path) -> None:
    text = """
name: full-agent
display_name: Full Agent
description: every field
author: Someone
license: MIT
version: 2.0.0
entrypoint: pkg.core:run
runtime: python3.11
environment: {MODE: prod, WORKERS: 4, DEBUG: false}
dependencies: [requests]
rest: {entry: api:mount}
a2a: {service: "grpc_srv:create_grpc_server"}
ui: {path: web/dist}
metadata: {version: 2.0.0, sub_agents: [{name: a}]}
"""
    m = load_manifest(pkg(tmp_path, text, {"web/dist/index.html": "<html></html>"}))
    assert m.display_name == "Full Agent" and m.author == "Someone" and m.license == "MIT"
    assert m.entrypoint == "pkg.core:run" and m.runtime == "python3.11"
    assert m.environment == {"MODE": "prod", "WORKERS": "4", "DEBUG": "false"}
    assert m.dependencies == ("requests",)
    assert (m.rest_entry, m.a2a_service, m.ui_path) == (
        "api:mount", "grpc_srv:create_grpc_server", "web/dist")
    assert m.surfaces == ("rest", "a2a", "ui")
    assert m.metadata["sub_agents"] == [{"name": "a"}]


def test_metadata_version_used_when_top_level_missing(tmp_path: Path) -> None:
    m = load_manifest(pkg(tmp_path, "name: a\nmetadata:\n  version: 3.1.4\n"))
    assert m.version == "3.1.4"


def test_top_level_version_wins_when_both_are_set(tmp_path: Path) -> None:
    m = load_manifest(pkg(tmp_path, "name: a\nversion: 1.0.0\nmetadata: {version: 9.9.9}\n"))
    assert m.version == "1.0.0"


def test_integer_version_is_accepted(tmp_path: Path) -> None:
    assert load_manifest(pkg(tmp_path, "name: a\nversion: 7\n")).version == "7"


def test_a2a_service_may_name_the_module_alone(tmp_path: Path) -> None:
    m = load_manifest(pkg(tmp_path, "name: a\nversion: '1'\na2a: {service: agent.grpc_srv}\n"))
    assert m.a2a_service == "agent.grpc_srv" and m.surfaces == ("a2a",)


def test_unknown_fields_are_kept_and_warned(tmp_path: Path) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.manifest.unknown")
    logger.addHandler(handler)
    logger.propagate = False
    text = "name: a\nversion: '1'\nfuture_field: {x: 1}\nui: {path: ui, basePath: /x}\n"
    m = load_manifest(pkg(tmp_path, text, {"ui/index.html": "hi"}), logger)
    assert m.extra == {"future_field": {"x": 1}, "ui.basePath": "/x"}
    line = json.loads(stream.getvalue().strip())
    assert line["level"] == "warning" and line["event"] == "Unknown manifest fields"
    assert line["fields"] == ["future_field", "ui.basePath"]


def test_missing_manifest(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(ParError) as info:
        load_manifest(root)
    assert (info.value.code, info.value.field) == ("manifest_missing", "agent.yaml")


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    err = bad(tmp_path, "name: a\nversion: [1\n", "manifest_yaml", "agent.yaml")
    assert "line" in err.message


def test_not_utf8(tmp_path: Path) -> None:
    root = pkg(tmp_path, "")
    (root / "agent.yaml").write_bytes(b"name: \xff\n")
    with pytest.raises(ParError) as info:
        load_manifest(root)
    assert info.value.code == "manifest_yaml"


BAD = [
    pytest.param("- a\n- b\n", "agent.yaml", id="top-level-list"),
    pytest.param("version: '1'\n", "name", id="missing-name"),
    pytest.param("name: Hello_Agent\nversion: '1'\n", "name", id="bad-name"),
    pytest.param("name: 1abc\nversion: '1'\n", "name", id="name-starts-with-digit"),
    pytest.param("name: a\n", "version", id="missing-version"),
    pytest.param("name: a\nversion: 1.10\n", "version", id="float-version"),
    pytest.param("name: a\nmetadata: {version: 1.5}\n", "metadata.version",
                 id="float-metadata-version"),
    pytest.param("name: a\nversion: ''\n", "version", id="empty-version"),
    pytest.param("name: a\nversion: '1'\nentrypoint: main.handler\n", "entrypoint",
                 id="entrypoint-without-colon"),
    pytest.param("name: a\nversion: '1'\nentrypoint: 'main:'\n", "entrypoint",
                 id="entrypoint-without-function"),
    pytest.param("name: a\nversion: '1'\nentrypoint: src/main.py:handler\n", "entrypoint",
                 id="entrypoint-is-a-path"),
    pytest.param("name: a\nversion: '1'\nentrypoint: [main]\n", "entrypoint",
                 id="entrypoint-wrong-type"),
    pytest.param("name: a\nversion: '1'\nrest: {entry: 'api:mount:x'}\n", "rest.entry",
                 id="rest-entry-malformed"),
    pytest.param("name: a\nversion: '1'\nrest: api:mount\n", "rest", id="rest-not-mapping"),
    pytest.param("name: a\nversion: '1'\na2a: {service: 42}\n", "a2a.service",
                 id="a2a-service-wrong-type"),
    pytest.param("name: a\nversion: '1'\na2a: {service: src/grpc.py}\n", "a2a.service",
                 id="a2a-service-is-a-path"),
    pytest.param("name: a\nversion: '1'\nrest: {entry: api}\n", "rest.entry",
                 id="rest-entry-module-alone"),
    pytest.param("name: a\nversion: '1'\nui: {path: ../outside}\n", "ui.path",
                 id="ui-path-escapes"),
    pytest.param("name: a\nversion: '1'\nui: {path: /etc}\n", "ui.path", id="ui-path-absolute"),
    pytest.param("name: a\nversion: '1'\nui: {path: nowhere}\n", "ui.path", id="ui-path-missing"),
    pytest.param("name: a\nversion: '1'\nui: {path: src}\n", "ui.path", id="ui-without-index"),
    pytest.param("name: a\nversion: '1'\nenvironment: [A=1]\n", "environment",
                 id="environment-not-mapping"),
    pytest.param("name: a\nversion: '1'\nenvironment: {A: {b: 1}}\n", "environment.A",
                 id="environment-nested"),
    pytest.param("name: a\nversion: '1'\nenvironment: {'BAD-KEY': x}\n", "environment.BAD-KEY",
                 id="environment-bad-key"),
    pytest.param("name: a\nversion: '1'\ndependencies: requests\n", "dependencies",
                 id="dependencies-not-list"),
    pytest.param("name: a\nversion: '1'\ndependencies: [1]\n", "dependencies[0]",
                 id="dependency-not-string"),
    pytest.param("name: a\nversion: '1'\ndescription: [x]\n", "description",
                 id="description-wrong-type"),
    pytest.param("name: a\nversion: '1'\nmetadata: [x]\n", "metadata", id="metadata-not-mapping"),
]


@pytest.mark.parametrize(("manifest", "field"), BAD)
def test_bad_manifest_names_the_field(tmp_path: Path, manifest: str, field: str) -> None:
    err = bad(tmp_path, manifest, "manifest_invalid", field, {"src/main.py": ""})
    assert field.split("[")[0] in err.message or field == "agent.yaml"


def test_ui_path_symlink_pointing_outside_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "index.html").write_text("x")
    root = pkg(tmp_path, "name: a\nversion: '1'\nui: {path: web}\n")
    (root / "web").symlink_to(outside)
    with pytest.raises(ParError) as info:
        load_manifest(root)
    assert (info.value.code, info.value.field) == ("manifest_invalid", "ui.path")


# --- .env ---------------------------------------------------------------------------

def test_parse_dotenv() -> None:
    text = """
# a comment
PLAIN=value
SPACED = padded value   # trailing comment
export EXPORTED=yes
SINGLE='literal $HOME \\n # not a comment'
DOUBLE="line1\\nline2 \\"quoted\\" # kept"
EMPTY=
HASH=a#b
URL=https://example.com/?a=1&b=2
PLAIN=overridden
"""
    assert parse_dotenv(text) == {
        "PLAIN": "overridden",
        "SPACED": "padded value",
        "EXPORTED": "yes",
        "SINGLE": "literal $HOME \\n # not a comment",
        "DOUBLE": 'line1\nline2 "quoted" # kept',
        "EMPTY": "",
        "HASH": "a#b",
        "URL": "https://example.com/?a=1&b=2",
    }


@pytest.mark.parametrize(("text", "line"), [
    ("OK=1\nNOEQUALS\n", 2),
    ("1BAD=x\n", 1),
    ("A='unterminated\n", 1),
    ('A="unterminated\n', 1),
    ("A='x' junk\n", 1),
])
def test_bad_dotenv_names_the_line(text: str, line: int) -> None:
    with pytest.raises(ParError) as info:
        parse_dotenv(text)
    assert (info.value.code, info.value.field) == ("dotenv_invalid", ".env")
    assert f"line {line}:" in info.value.message


def test_read_dotenv(tmp_path: Path) -> None:
    assert read_dotenv(tmp_path) == {}
    (tmp_path / ".env").write_text("A=1\n")
    assert read_dotenv(tmp_path) == {"A": "1"}
