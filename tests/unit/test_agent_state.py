"""Agents' state folders are scoped by org and cleared on purge (attack 9)."""

from __future__ import annotations

from pathlib import Path

from par import agent_state


def make(var_lib: Path, relative: str) -> Path:
    real = var_lib / "private" / relative
    real.mkdir(parents=True)
    (real / "secret").write_text("org-1 data")
    link = var_lib / relative
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(real)
    return real


def test_another_org_gets_another_folder() -> None:
    a = agent_state.state_directory("bot", "org-1")
    b = agent_state.state_directory("bot", "org-2")
    assert a != b and a.endswith("/bot") and b.endswith("/bot")
    assert agent_state.state_directory("bot", "../../etc").count("/") == 2  # a digest, no path


def test_clear_removes_the_folder_its_link_and_the_empty_org(tmp_path: Path) -> None:
    rel = agent_state.state_directory("bot", "org-1")
    make(tmp_path, rel)
    other = make(tmp_path, agent_state.state_directory("bot", "org-2"))
    removed = agent_state.clear("bot", "org-1", tmp_path)
    assert str(tmp_path / "private" / rel) in removed
    assert not (tmp_path / "private" / rel).exists() and not (tmp_path / rel).is_symlink()
    assert not (tmp_path / "private" / rel).parent.exists()
    assert (other / "secret").exists()  # the other org's is untouched


def test_legacy_folder_moves_to_the_org_once(tmp_path: Path) -> None:
    make(tmp_path, "par-agent/bot")
    assert agent_state.migrate_legacy("bot", "org-1", tmp_path)
    new = tmp_path / "private" / agent_state.state_directory("bot", "org-1")
    assert (new / "secret").read_text() == "org-1 data"
    assert not (tmp_path / "par-agent/bot").is_symlink()
    assert not agent_state.migrate_legacy("bot", "org-1", tmp_path)
