"""Safe extraction: every hostile archive is refused with its own code, leaving nothing."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import pytest

from par import layout
from par.errors import ParError
from par.extract import extract_package
from par.manifest import load_manifest
from tests.unit.apkg_factory import (
    GOOD_MAIN,
    GOOD_MANIFEST,
    Entry,
    make_cfg,
    package,
    patch_header,
    pkware_unix_extra,
    replace_bytes,
    tree,
    write_zip,
)

AGENT, VERSION = "demo", "1.0.0"


def base() -> list[Entry]:
    return [Entry("agent.yaml", GOOD_MANIFEST.encode()), Entry("src/main.py", GOOD_MAIN.encode())]


def refused(tmp_path: Path, apkg: Path, code: str, field: str | None = None, **limits) -> ParError:
    """Extract `apkg`, expect ParError `code` (and `field`), and an empty extracted/."""
    cfg = make_cfg(tmp_path, **limits)
    with pytest.raises(ParError) as info:
        extract_package(cfg, AGENT, VERSION, apkg)
    err = info.value
    assert err.code == code, err
    if field is not None:
        assert err.field == field
    assert tree(layout.extracted(cfg)) == []
    return err


def test_good_package_extracts_with_normalized_modes(tmp_path: Path) -> None:
    entries = base() + [
        Entry("bin/tool.sh", b"#!/bin/sh\n", stat.S_IFREG | 0o4755),  # setuid: dropped
        Entry("secret.txt", b"s", stat.S_IFREG | 0o600),  # unreadable: widened
        Entry("data/", b"", stat.S_IFDIR | 0o700),
        Entry("data/sub/x.json", b"{}", stat.S_IFREG | 0o2644),  # setgid: dropped
        Entry("win.txt", b"w", None, create_system=0),
    ]
    apkg = write_zip(tmp_path / "in.apkg", entries)
    cfg = make_cfg(tmp_path)
    old_umask = os.umask(0o077)  # a strict umask must not narrow what agents can read
    try:
        root = extract_package(cfg, AGENT, VERSION, apkg)
    finally:
        os.umask(old_umask)
    assert root == layout.extracted(cfg) / "demo@1.0.0"
    assert tree(layout.extracted(cfg)) == ["demo@1.0.0"] + [
        f"demo@1.0.0/{p}" for p in ["agent.yaml", "bin", "bin/tool.sh", "data", "data/sub",
                                    "data/sub/x.json", "secret.txt", "src", "src/main.py",
                                    "win.txt"]]
    modes = {p: stat.S_IMODE((root / p).stat().st_mode)
             for p in ["", "bin", "bin/tool.sh", "secret.txt", "data", "data/sub",
                       "data/sub/x.json", "win.txt"]}
    assert modes == {"": 0o755, "bin": 0o755, "bin/tool.sh": 0o755, "secret.txt": 0o644,
                     "data": 0o755, "data/sub": 0o755, "data/sub/x.json": 0o644,
                     "win.txt": 0o644}
    assert (root / "src/main.py").read_text() == GOOD_MAIN
    assert load_manifest(root).name == "demo-agent"


def test_reextract_replaces_old_folder(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    first = package(tmp_path / "a.apkg", {"old.txt": "old"})
    second = package(tmp_path / "b.apkg", {"new.txt": "new"})
    extract_package(cfg, AGENT, VERSION, first)
    root = extract_package(cfg, AGENT, VERSION, second)
    assert (root / "new.txt").read_text() == "new"
    assert not (root / "old.txt").exists()
    assert [p.name for p in layout.extracted(cfg).iterdir()] == ["demo@1.0.0"]


def test_refused_archive_keeps_previous_extraction(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    extract_package(cfg, AGENT, VERSION, package(tmp_path / "a.apkg", {"keep.txt": "k"}))
    bad = write_zip(tmp_path / "bad.apkg", base() + [Entry("../evil", b"x")])
    with pytest.raises(ParError):
        extract_package(cfg, AGENT, VERSION, bad)
    assert tree(layout.extracted(cfg)) == ["demo@1.0.0", "demo@1.0.0/agent.yaml",
                                         "demo@1.0.0/keep.txt", "demo@1.0.0/src",
                                         "demo@1.0.0/src/main.py"]


def test_check_hook_refusal_leaves_nothing(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    apkg = package(tmp_path / "in.apkg", {}, manifest="name: Bad_Name\nversion: '1'\n")
    with pytest.raises(ParError) as info:
        extract_package(cfg, AGENT, VERSION, apkg, check=load_manifest)
    assert (info.value.code, info.value.field) == ("manifest_invalid", "name")
    assert tree(layout.extracted(cfg)) == []


def test_stale_temp_folders_are_cleaned(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    stale = layout.extracted(cfg) / ".demo@1.0.0~abc.tmp"
    other = layout.extracted(cfg) / ".demo@1.0.01~abc.tmp"  # another version: untouched
    (stale / "src").mkdir(parents=True)
    other.mkdir()
    extract_package(cfg, AGENT, VERSION, package(tmp_path / "a.apkg", {}))
    assert not stale.exists()
    assert other.exists()


def test_utf8_name_without_flag_is_accepted(tmp_path: Path) -> None:
    apkg = write_zip(tmp_path / "in.apkg", base() + [Entry("caf__.txt", b"x")])
    replace_bytes(apkg, b"caf__.txt", "café.txt".encode())
    root = extract_package(make_cfg(tmp_path), AGENT, VERSION, apkg)
    assert (root / "café.txt").read_bytes() == b"x"


def test_windows_backslash_names_become_folders(tmp_path: Path) -> None:
    apkg = write_zip(tmp_path / "in.apkg", base() + [Entry("lib\\util.py", b"u")])
    root = extract_package(make_cfg(tmp_path), AGENT, VERSION, apkg)
    assert (root / "lib" / "util.py").read_bytes() == b"u"


# --- refused archives: one per rule --------------------------------------------------

BAD_ENTRIES = [
    pytest.param([Entry("../evil.py", b"x")], "archive_path_traversal", "../evil.py",
                 id="zip-slip-dotdot"),
    pytest.param([Entry("src/../../evil.py", b"x")], "archive_path_traversal",
                 "src/../../evil.py", id="zip-slip-nested"),
    pytest.param([Entry("..\\..\\evil.py", b"x")], "archive_path_traversal", "..\\..\\evil.py",
                 id="zip-slip-backslash"),
    pytest.param([Entry("/etc/cron.d/evil", b"x")], "archive_absolute_path", "/etc/cron.d/evil",
                 id="absolute-path"),
    pytest.param([Entry("C:/evil.py", b"x")], "archive_absolute_path", "C:/evil.py",
                 id="absolute-drive"),
    pytest.param([Entry("link", b"/etc/passwd", stat.S_IFLNK | 0o777)], "archive_symlink",
                 "link", id="symlink"),
    pytest.param([Entry("hard", b"", stat.S_IFREG | 0o644,
                        extra=pkware_unix_extra(b"agent.yaml"))], "archive_hardlink", "hard",
                 id="hardlink"),
    pytest.param([Entry("dev", b"", stat.S_IFCHR | 0o644)], "archive_device", "dev",
                 id="char-device"),
    pytest.param([Entry("blk", b"", stat.S_IFBLK | 0o644)], "archive_device", "blk",
                 id="block-device"),
    pytest.param([Entry("pipe", b"", stat.S_IFIFO | 0o644)], "archive_fifo", "pipe", id="fifo"),
    pytest.param([Entry("sock", b"", stat.S_IFSOCK | 0o644)], "archive_special_file", "sock",
                 id="socket"),
    pytest.param([Entry("src/main.py", b"again")], "archive_duplicate", "src/main.py",
                 id="duplicate"),
    pytest.param([Entry("./src//main.py", b"again")], "archive_duplicate", "./src//main.py",
                 id="duplicate-after-normalizing"),
    pytest.param([Entry("agent.yaml/inner", b"x")], "archive_duplicate", "agent.yaml/inner",
                 id="file-used-as-folder"),
    pytest.param([Entry("x\nname", b"x")], "archive_bad_name", "x\nname", id="control-char"),
    pytest.param([Entry("x", b"x", flag_bits=0x1)], "archive_encrypted", "x", id="encrypted"),
]


@pytest.mark.parametrize(("extra", "code", "field"), BAD_ENTRIES)
def test_bad_entry_is_refused(tmp_path: Path, extra: list[Entry], code: str, field: str) -> None:
    apkg = write_zip(tmp_path / "in.apkg", base() + extra)
    err = refused(tmp_path, apkg, code, field)
    assert repr(field) in err.message


def test_folder_then_file_of_same_name_is_refused(tmp_path: Path) -> None:
    apkg = write_zip(tmp_path / "in.apkg", base() + [Entry("lib/a.py", b"a"), Entry("lib", b"")])
    refused(tmp_path, apkg, "archive_duplicate", "lib")


def test_non_utf8_name_is_refused(tmp_path: Path) -> None:
    apkg = write_zip(tmp_path / "in.apkg", base() + [Entry("bad_X.txt", b"x")])
    replace_bytes(apkg, b"bad_X.txt", b"bad_\xff.txt")
    err = refused(tmp_path, apkg, "archive_bad_name")
    assert "bad_\\xff.txt" in err.message


def test_flagged_utf8_name_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    apkg = write_zip(tmp_path / "in.apkg", base() + [Entry("bad_é.txt", b"x")])
    replace_bytes(apkg, "bad_é.txt".encode(), b"bad_\xff\xfe.txt")
    refused(tmp_path, apkg, "archive_bad_name")


def test_bomb_by_ratio(tmp_path: Path) -> None:
    apkg = write_zip(tmp_path / "in.apkg", base() + [Entry("zeros.bin", bytes(4 * 1024 * 1024))])
    err = refused(tmp_path, apkg, "archive_ratio", "zeros.bin")
    assert "200" in err.message


def test_small_compressible_file_is_not_held_to_the_ratio(tmp_path: Path) -> None:
    apkg = write_zip(tmp_path / "in.apkg", base() + [Entry("zeros.bin", bytes(512 * 1024))])
    root = extract_package(make_cfg(tmp_path), AGENT, VERSION, apkg)
    assert (root / "zeros.bin").stat().st_size == 512 * 1024


def test_bomb_by_total(tmp_path: Path) -> None:
    chunks = [Entry(f"part{i}.bin", os.urandom(4000), compress=zipfile.ZIP_STORED)
              for i in range(5)]
    apkg = write_zip(tmp_path / "in.apkg", base() + chunks)
    refused(tmp_path, apkg, "archive_too_large", "part2.bin", max_unpacked_bytes=10_000)


def test_too_many_entries(tmp_path: Path) -> None:
    apkg = write_zip(tmp_path / "in.apkg", base() + [Entry(f"f{i}", b"") for i in range(10)])
    err = refused(tmp_path, apkg, "archive_too_many_entries", None, max_entries=5)
    assert "12" in err.message


def test_header_declaring_fewer_bytes_than_the_data(tmp_path: Path) -> None:
    # The declared size passes every limit; the real bytes are what the CRC covers.
    apkg = write_zip(tmp_path / "in.apkg", base() + [Entry("big.txt", b"ab" * 5000)])
    patch_header(apkg, "big.txt", "file_size", 10)
    refused(tmp_path, apkg, "archive_corrupt", "big.txt")


def test_header_declaring_more_bytes_than_the_data(tmp_path: Path) -> None:
    apkg = write_zip(tmp_path / "in.apkg", base() + [Entry("short.txt", b"abc" * 100,
                                                           compress=zipfile.ZIP_STORED)])
    patch_header(apkg, "short.txt", "file_size", 400)
    refused(tmp_path, apkg, "archive_corrupt", "short.txt")


def test_corrupt_data_is_refused(tmp_path: Path) -> None:
    apkg = write_zip(tmp_path / "in.apkg", base() + [Entry("data.txt", b"hello world " * 50,
                                                           compress=zipfile.ZIP_STORED)])
    replace_bytes(apkg, b"hello world hello", b"HELLO world hello")
    refused(tmp_path, apkg, "archive_corrupt", "data.txt")


def test_not_a_zip(tmp_path: Path) -> None:
    apkg = tmp_path / "in.apkg"
    apkg.write_bytes(b"<html>Access denied</html>\n")
    err = refused(tmp_path, apkg, "archive_invalid")
    assert "not a zip" in err.message


def test_empty_file(tmp_path: Path) -> None:
    apkg = tmp_path / "in.apkg"
    apkg.write_bytes(b"")
    refused(tmp_path, apkg, "archive_invalid")


def test_truncated_zip(tmp_path: Path) -> None:
    apkg = package(tmp_path / "in.apkg", {"big.bin": os.urandom(20_000)})
    apkg.write_bytes(apkg.read_bytes()[:-5000])
    err = refused(tmp_path, apkg, "archive_truncated")
    assert "incomplete" in err.message


def test_missing_package_file(tmp_path: Path) -> None:
    refused(tmp_path, tmp_path / "nope.apkg", "package_missing")


@pytest.mark.parametrize(("agent", "version", "field"), [
    ("../x", "1.0", "agentAppId"), ("demo", "../1", "version"), ("demo", "1/2", "version")])
def test_bad_ids_are_refused_before_any_path_is_built(tmp_path: Path, agent: str, version: str,
                                                      field: str) -> None:
    cfg = make_cfg(tmp_path)
    with pytest.raises(ParError) as info:
        extract_package(cfg, agent, version, package(tmp_path / "a.apkg", {}))
    assert (info.value.code, info.value.field) == ("invalid_id", field)
    assert not layout.extracted(cfg).exists()


def test_package_path_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "dir.apkg").mkdir()
    refused(tmp_path, tmp_path / "dir.apkg", "package_unreadable")


def test_cleanup_stale_removes_interrupted_extractions(tmp_path: Path) -> None:
    from par.config import Config, with_state_dir
    from par.extract import cleanup_stale
    from par.fetch import cleanup_stale as cleanup_downloads

    cfg = with_state_dir(Config(), tmp_path)
    (layout.extracted(cfg) / ".a@1.0~x1.tmp" / "src").mkdir(parents=True)
    (layout.extracted(cfg) / ".a@1.0~x2.old").mkdir()
    (layout.extracted(cfg) / "a@1.0").mkdir()
    layout.packages(cfg).mkdir(parents=True)
    (layout.packages(cfg) / ".a@1.0.apkg~zz.part").write_bytes(b"half")
    (layout.packages(cfg) / "a@1.0.apkg").write_bytes(b"whole")
    assert len(cleanup_stale(cfg)) == 2
    assert len(cleanup_downloads(cfg)) == 1
    assert sorted(p.name for p in layout.extracted(cfg).iterdir()) == ["a@1.0"]
    assert sorted(p.name for p in layout.packages(cfg).iterdir()) == ["a@1.0.apkg"]


def test_compile_sources_leaves_readable_bytecode_and_skips_bad_files(tmp_path: Path) -> None:
    import sys

    from par.extract import compile_sources

    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "main.py").write_text("import pkg\n")
    (tmp_path / "src" / "pkg" / "__init__.py").write_text("X = 1\n")
    (tmp_path / "src" / "broken.py").write_text("def (:\n")
    compile_sources(tmp_path)
    tag = sys.implementation.cache_tag
    for src in ("src/main.py", "src/pkg/__init__.py"):
        path = tmp_path / src
        pyc = path.parent / "__pycache__" / f"{path.stem}.{tag}.pyc"
        assert pyc.is_file() and pyc.stat().st_mode & 0o777 == 0o644, pyc
        assert (pyc.parent.stat().st_mode & 0o777) == 0o755
    assert not (tmp_path / "src" / "__pycache__" / f"broken.{tag}.pyc").exists()
