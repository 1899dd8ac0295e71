"""pard refuses a TCP token file other local users could read or change (attack 11)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from par.daemon import check_token_file_mode, read_token
from par.errors import ParError


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o620])
def test_group_or_world_bits_are_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    token = tmp_path / "token"
    with pytest.raises(ParError) as err:
        check_token_file_mode(token, 0o100000 | mode, 0)
    assert err.value.code == "token_unsafe"
    assert str(token) in err.value.message and f"{mode:04o}" in err.value.message
    assert "chmod 600" in err.value.message
    assert err.value.field == "listen.token_file"


def test_a_token_not_owned_by_root_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ParError) as err:
        check_token_file_mode(tmp_path / "token", 0o100600, 1000)
    assert err.value.code == "token_unsafe" and "uid 1000" in err.value.message


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_root_only_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    check_token_file_mode(tmp_path / "token", 0o100000 | mode, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="the file must be owned by root")
def test_read_token_checks_the_file_it_reads(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    token.chmod(0o644)
    with pytest.raises(ParError, match="chmod 600"):
        read_token(token)
    token.chmod(0o600)
    assert read_token(token) == "secret-token"
