"""Effective requirements: surface needs added only when missing, refused lines quoted."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from par.errors import ParError
from par.manifest import Manifest
from par.requirements import Policy, effective_requirements, normalize_name, parse_requirements

REPO = Path(__file__).resolve().parents[2]
PLAIN = Manifest(name="a", version="1")
REST = Manifest(name="a", version="1", rest_entry="api:mount")
A2A = Manifest(name="a", version="1", a2a_service="srv:create_grpc_server")
BOTH = Manifest(name="a", version="1", rest_entry="api:mount", a2a_service="srv:create")
UI_ONLY = Manifest(name="a", version="1", ui_path="ui")


def root_with(tmp_path: Path, text: str | bytes | None) -> Path:
    if isinstance(text, str):
        (tmp_path / "requirements.txt").write_text(text, encoding="utf-8")
    elif isinstance(text, bytes):
        (tmp_path / "requirements.txt").write_bytes(text)
    return tmp_path


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_no_file_and_no_surfaces_is_empty(tmp_path: Path) -> None:
    req = effective_requirements(tmp_path, PLAIN, False)
    assert (req.text, req.lines, req.added) == ("", (), ())
    assert req.sha256 == sha("") and req.short == sha("")[:7]


def test_ui_needs_nothing(tmp_path: Path) -> None:
    assert effective_requirements(tmp_path, UI_ONLY, False).text == ""


def test_no_file_with_rest_surface(tmp_path: Path) -> None:
    req = effective_requirements(tmp_path, REST, False)
    assert req.text == "fastapi\nuvicorn\n"
    assert req.added == ("fastapi", "uvicorn")
    assert req.sha256 == sha("fastapi\nuvicorn\n")


def test_file_bytes_kept_as_is_when_nothing_is_added(tmp_path: Path) -> None:
    text = "# pinned\nrequests==2.31.0  # http\n\nPyYAML>=6\n"
    req = effective_requirements(root_with(tmp_path, text), PLAIN, False)
    assert req.text == text and req.sha256 == sha(text)
    assert req.lines == ("requests==2.31.0", "PyYAML>=6")


def test_agent_pins_win_and_only_missing_needs_are_added(tmp_path: Path) -> None:
    text = "grpcio==1.73.1\nFastAPI==0.110.0"  # no final newline; 'FastAPI' names fastapi
    req = effective_requirements(root_with(tmp_path, text), BOTH, False)
    assert req.text == "grpcio==1.73.1\nFastAPI==0.110.0\nuvicorn\nprotobuf\n"
    assert req.added == ("uvicorn", "protobuf")
    assert req.sha256 == sha(req.text)


@pytest.mark.parametrize("spelling", [
    "Uvicorn[standard]>=0.20",
    "uvicorn ; python_version>'3'",
    "uvicorn @ https://example.com/uvicorn-0.30-py3-none-any.whl",
])
def test_needs_are_matched_by_normalized_name(tmp_path: Path, spelling: str) -> None:
    req = effective_requirements(root_with(tmp_path, f"fastapi\n{spelling}\n"), REST, False)
    assert req.added == ()


def test_protobuf_spelled_differently_still_counts(tmp_path: Path) -> None:
    req = effective_requirements(root_with(tmp_path, "GRPCIO==1.73.1\nProtoBuf\n"), A2A, False)
    assert req.added == ()


def test_different_surfaces_give_different_hashes(tmp_path: Path) -> None:
    root = root_with(tmp_path, "requests\n")
    hashes = {effective_requirements(root, m, False).sha256 for m in (PLAIN, REST, A2A, BOTH)}
    assert len(hashes) == 4


def test_bom_is_dropped(tmp_path: Path) -> None:
    req = effective_requirements(root_with(tmp_path, b"\xef\xbb\xbfrequests\n"), PLAIN, False)
    assert req.text == "requests\n"


def test_continuation_and_hashes(tmp_path: Path) -> None:
    text = "requests==2.31.0 \\\n    --hash=sha256:abc\n--require-hashes\n"
    req = effective_requirements(root_with(tmp_path, text), PLAIN, False)
    assert req.lines == ("requests==2.31.0     --hash=sha256:abc", "--require-hashes")


def test_index_options_allowed_by_config(tmp_path: Path) -> None:
    text = "--index-url https://pypi.example/simple\n--extra-index-url https://x/simple\nfoo\n"
    req = effective_requirements(root_with(tmp_path, text), PLAIN, True)
    assert req.text == text


def test_typical_requirements_pass(tmp_path: Path) -> None:
    text = (REPO / "tests/data/typical-requirements.txt").read_text()
    lines, names = parse_requirements(text, False)
    assert {"fastapi", "uvicorn", "grpcio", "protobuf", "pydantic", "requests", "httpx",
            "pyyaml"} <= names
    assert effective_requirements(root_with(tmp_path, text), BOTH, False).added == ()


def test_normalize_name() -> None:
    assert normalize_name("Foo_Bar..baz-Qux") == "foo-bar-baz-qux"


BAD = [
    pytest.param("-e git+https://github.com/x/y.git#egg=y", "requirements_editable", id="editable"),
    pytest.param("--editable=./pkg", "requirements_editable", id="editable-long"),
    pytest.param("-e.", "requirements_editable", id="editable-joined"),
    pytest.param("--index-url https://evil.example/simple", "requirements_index_option",
                 id="index-url"),
    pytest.param("-i https://evil.example/simple", "requirements_index_option", id="index-short"),
    pytest.param("--extra-index-url=https://evil.example/simple", "requirements_index_option",
                 id="extra-index-url"),
    pytest.param("--find-links /tmp/wheels", "requirements_index_option", id="find-links"),
    pytest.param("--trusted-host evil.example", "requirements_index_option", id="trusted-host"),
    pytest.param("./vendor/pkg", "requirements_local", id="relative-path"),
    pytest.param("/opt/wheels/x-1.0-py3-none-any.whl", "requirements_local", id="absolute-path"),
    pytest.param("mypkg-1.0.tar.gz", "requirements_local", id="archive-file"),
    pytest.param("file:///opt/pkg", "requirements_local", id="file-url"),
    pytest.param("mypkg @ file:///opt/pkg", "requirements_local", id="name-at-file-url"),
    pytest.param("-r other.txt", "requirements_option", id="include-file"),
    pytest.param("-c constraints.txt", "requirements_option", id="constraints-file"),
    pytest.param("--use-feature=fast-deps", "requirements_option", id="unknown-option"),
    pytest.param("!!!", "requirements_invalid", id="garbage"),
]


@pytest.mark.parametrize(("line", "code"), BAD)
def test_refused_line_is_quoted(tmp_path: Path, line: str, code: str) -> None:
    root = root_with(tmp_path, f"requests\n\n{line}\n")
    with pytest.raises(ParError) as info:
        effective_requirements(root, PLAIN, False)
    assert (info.value.code, info.value.field) == (code, "requirements.txt")
    assert f"line 3: {line!r}" in info.value.message


def test_not_utf8_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ParError) as info:
        effective_requirements(root_with(tmp_path, b"caf\xe9\n"), PLAIN, False)
    assert info.value.code == "requirements_invalid"


def test_symlinked_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere.txt").write_text("requests\n")
    (tmp_path / "requirements.txt").symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(ParError) as info:
        effective_requirements(tmp_path, PLAIN, False)
    assert info.value.code == "requirements_invalid"


# -- lines split as pip splits them (the `\` bypass) ---------------------------------------


@pytest.mark.parametrize("hidden", ["-r /etc/shadow", "--index-url http://evil/simple",
                                    "-e /local/path"])
def test_a_comment_ending_in_a_backslash_is_refused(tmp_path: Path, hidden: str) -> None:
    """pip does not continue a comment line; PAR once joined it with the next one, so
    the next line reached pip unchecked."""
    root = root_with(tmp_path, f"requests\n# pinned \\\n{hidden}\n")
    with pytest.raises(ParError) as info:
        effective_requirements(root, PLAIN, False)
    assert (info.value.code, info.value.field) == ("requirements_continuation",
                                                   "requirements.txt")
    assert "requirements.txt line 2" in info.value.message


def test_a_trailing_comment_ending_in_a_backslash_is_refused() -> None:
    with pytest.raises(ParError) as info:
        parse_requirements("requests  # http \\\n-r /etc/shadow\n")
    assert info.value.code == "requirements_continuation"


def test_continuations_without_comments_join_as_pip_joins_them() -> None:
    lines, names = parse_requirements("requests==2.31.0 \\\n  --hash=sha256:abc \\\n"
                                      "  --hash=sha256:def\n")
    assert lines == ("requests==2.31.0   --hash=sha256:abc   --hash=sha256:def",)
    assert names == {"requests"}


def test_a_continued_line_cannot_smuggle_an_option() -> None:
    """What a continuation joins is checked whole: only --hash may follow a requirement."""
    with pytest.raises(ParError) as info:
        parse_requirements("requests \\\n  -r /etc/shadow\n")
    assert info.value.code == "requirements_option" and "-r" in info.value.message


@pytest.mark.parametrize("sep", ["\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028"])
def test_line_breaks_pip_and_uv_read_differently_are_refused(sep: str) -> None:
    with pytest.raises(ParError) as info:
        parse_requirements(f"requests{sep}-r /etc/shadow\n")
    assert info.value.code == "requirements_invalid" and "line 1" in info.value.message


def test_crlf_is_fine() -> None:
    assert parse_requirements("requests\r\nPyYAML\r\n")[1] == {"requests", "pyyaml"}


def test_whitespace_after_a_continuation_backslash_is_refused() -> None:
    with pytest.raises(ParError) as info:
        parse_requirements("requests \\ \n-r /etc/shadow\n")
    assert info.value.code == "requirements_continuation"


# -- policies: prewarm and installer.only_binary -----------------------------------------------


PREWARM = Policy(label="requirements", allow_urls=False)


@pytest.mark.parametrize(("text", "code"), [
    ("-r /etc/shadow\n", "requirements_option"),
    ("-e .\n", "requirements_editable"),
    ("evil @ http://127.0.0.1:9/evil-1.0.tar.gz\n", "requirements_url"),
    ("https://example.com/x-1.0-py3-none-any.whl\n", "requirements_url"),
])
def test_prewarm_policy_refuses_naming_its_field(text: str, code: str) -> None:
    with pytest.raises(ParError) as info:
        parse_requirements(text, PREWARM)
    assert (info.value.code, info.value.field) == (code, "requirements")
    assert info.value.message.startswith("requirements line 1:")


@pytest.mark.parametrize("line", [
    "evil @ https://example.com/evil-1.0.tar.gz",
    "evil @ git+https://example.com/evil.git",
    "--no-binary :all:",
])
def test_only_binary_refuses_source_builds(line: str) -> None:
    with pytest.raises(ParError) as info:
        parse_requirements(f"{line}\n", Policy(only_binary=True))
    assert info.value.code == "requirements_sdist" and "only_binary" in info.value.message
    parse_requirements(f"{line}\n", Policy())  # allowed otherwise


def test_only_binary_allows_wheel_urls() -> None:
    line = "ok @ https://example.com/ok-1.0-py3-none-any.whl#sha256=abc\n"
    assert parse_requirements(line, Policy(only_binary=True))[1] == {"ok"}
