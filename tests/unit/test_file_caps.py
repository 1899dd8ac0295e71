"""Caps on the files pard parses (agent.yaml, .env, requirements.txt), checked before reading."""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import pytest

from par import config, layout
from par.config import Limits
from par.errors import ParError
from par.extract import extract_package
from par.file_caps import Cap, caps, check_on_disk, read_capped
from par.manifest import load_manifest, read_dotenv
from par.pipeline import read_package
from tests.unit.apkg_factory import GOOD_MANIFEST, make_cfg, package, patch_header, tree

AGENT, VERSION = "demo", "1.0.0"
# limit key in par.yaml -> the file it caps
CAPPED = {"max_manifest_bytes": "agent.yaml", "max_dotenv_bytes": ".env",
          "max_requirements_bytes": "requirements.txt"}


def _content(name: str, size: int) -> bytes:
    """A valid file of `name` padded with comment lines to exactly `size` bytes."""
    head = {"agent.yaml": GOOD_MANIFEST, ".env": "A=1\n", "requirements.txt": "\n"}[name].encode()
    pad = size - len(head)
    lines = b"".join(b"#" + b"x" * 62 + b"\n" for _ in range(pad // 64))
    return head + lines + b"#" * (pad - len(lines))


def _files(name: str, size: int) -> tuple[dict[str, bytes], str | None]:
    if name == "agent.yaml":
        return {}, _content(name, size).decode()
    return {name: _content(name, size)}, GOOD_MANIFEST


def test_defaults_are_documented_keys() -> None:
    limits = Limits()
    assert limits.max_manifest_bytes == 1024 * 1024
    assert limits.max_dotenv_bytes == 256 * 1024
    assert limits.max_requirements_bytes == 1024 * 1024
    text = config.render_yaml()
    for key in CAPPED:
        assert f"  {key}: " in text


@pytest.mark.parametrize("key", list(CAPPED))
def test_cap_must_be_positive(key: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.from_dict({"limits": {key: 0}})
    assert info.value.field == f"limits.{key}"


@pytest.mark.parametrize(("key", "name"), list(CAPPED.items()))
def test_extraction_refuses_a_file_over_its_cap(tmp_path: Path, key: str, name: str) -> None:
    limit = 4096
    files, manifest = _files(name, limit + 1)
    apkg = package(tmp_path / "in.apkg", files, manifest=manifest)
    cfg = make_cfg(tmp_path, **{key: limit})
    with pytest.raises(ParError) as info:
        extract_package(cfg, AGENT, VERSION, apkg)
    err = info.value
    assert (err.code, err.field) == ("file_too_large", name)
    assert name in err.message and str(limit + 1) in err.message and str(limit) in err.message
    assert f"limits.{key}" in err.message
    assert tree(layout.extracted(cfg)) == []


@pytest.mark.parametrize(("key", "name"), list(CAPPED.items()))
def test_a_file_at_its_cap_is_fine(tmp_path: Path, key: str, name: str) -> None:
    limit = 4096
    files, manifest = _files(name, limit)
    apkg = package(tmp_path / "in.apkg", files, manifest=manifest)
    cfg = make_cfg(tmp_path, **{key: limit})
    root = extract_package(cfg, AGENT, VERSION, apkg,
                           check=lambda r: read_package(r, cfg, None))
    assert (root / name).stat().st_size == limit


def test_only_the_top_level_file_is_capped(tmp_path: Path) -> None:
    # src/agent.yaml is the agent's own data, held only to the package's total size
    apkg = package(tmp_path / "in.apkg", {"src/agent.yaml": "#" * 8192, "src/.env": "#" * 8192})
    cfg = make_cfg(tmp_path, max_manifest_bytes=4096, max_dotenv_bytes=4096)
    extract_package(cfg, AGENT, VERSION, apkg)


def test_a_lying_header_stops_at_the_declared_size(tmp_path: Path) -> None:
    # declared 100 bytes, 64 KiB inside: refused while copying, never written whole
    big = GOOD_MANIFEST + "#" * 65536
    apkg = package(tmp_path / "in.apkg", {}, manifest=big)
    patch_header(apkg, "agent.yaml", "file_size", 100)
    cfg = make_cfg(tmp_path, max_manifest_bytes=4096)
    with pytest.raises(ParError) as info:
        extract_package(cfg, AGENT, VERSION, apkg)
    assert info.value.code in ("archive_corrupt", "file_too_large")
    assert tree(layout.extracted(cfg)) == []


def test_readers_refuse_a_file_on_disk_over_the_cap(tmp_path: Path) -> None:
    limits = dataclasses.replace(Limits(), max_manifest_bytes=4096, max_dotenv_bytes=4096)
    (tmp_path / "agent.yaml").write_bytes(_content("agent.yaml", 4097))
    (tmp_path / ".env").write_bytes(_content(".env", 4097))
    with pytest.raises(ParError) as info:
        load_manifest(tmp_path, None, limits)
    assert (info.value.code, info.value.field) == ("file_too_large", "agent.yaml")
    with pytest.raises(ParError) as info:
        read_dotenv(tmp_path, limits)
    assert (info.value.code, info.value.field) == ("file_too_large", ".env")
    # under the default caps both are fine
    assert load_manifest(tmp_path).name == "demo-agent"
    assert read_dotenv(tmp_path) == {"A": "1"}


def test_read_package_checks_requirements_on_disk(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, max_requirements_bytes=100)
    (tmp_path / "agent.yaml").write_text(GOOD_MANIFEST)
    (tmp_path / "requirements.txt").write_bytes(_content("requirements.txt", 101))
    with pytest.raises(ParError) as info:
        read_package(tmp_path, cfg, None)
    assert (info.value.code, info.value.field) == ("file_too_large", "requirements.txt")


def test_read_capped_reads_no_more_than_the_cap(tmp_path: Path) -> None:
    cap = Cap("x", 10, "limits.x")
    path = tmp_path / "x"
    path.write_bytes(b"0123456789")
    assert read_capped(path, cap) == b"0123456789"
    path.write_bytes(b"0123456789A")
    with pytest.raises(ParError):
        read_capped(path, cap)
    check_on_disk(tmp_path / "missing", cap)
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(OSError):
        read_capped(link, cap)


def test_caps_name_every_parsed_file() -> None:
    assert set(caps(Limits())) == set(CAPPED.values())


def test_parctl_uses_the_default_cap(tmp_path: Path) -> None:
    from par.cli.deploy_source import apkg_name_version
    big = _content("agent.yaml", Limits().max_manifest_bytes + 1).decode()
    apkg = package(tmp_path / "in.apkg", {}, manifest=big)
    with pytest.raises(ParError) as info:
        apkg_name_version(apkg)
    assert info.value.code == "file_too_large" and "limits.max_manifest_bytes" in info.value.message
    with zipfile.ZipFile(apkg) as zf:
        assert zf.getinfo("agent.yaml").file_size == Limits().max_manifest_bytes + 1
