"""The configuration: strict loading and the shipped default file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from par import config, layout

REPO = Path(__file__).resolve().parents[2]


# md5 of the /etc/par/par.yaml that PAR 0.1.0 shipped: the conffile stays these bytes,
# so dpkg upgrades an operator's edited copy without a prompt (tests/deb/test-upgrade)
CONFFILE_MD5 = "c23275904d6a21ae8baefcef16254846"


def test_reference_is_the_rendered_defaults() -> None:
    reference = (REPO / "docs/par.yaml").read_text()
    assert reference == config.render_yaml(), \
        "regenerate docs/par.yaml from par.config.render_yaml()"
    assert config.from_dict(yaml.safe_load(reference)) == config.Config()


def test_shipped_conffile_is_stable_and_sets_only_defaults() -> None:
    import hashlib

    shipped = (REPO / "etc/par/par.yaml").read_bytes()
    assert hashlib.md5(shipped).hexdigest() == CONFFILE_MD5, \
        "etc/par/par.yaml is the conffile: changing it makes dpkg prompt operators who edited it"
    assert config.from_dict(yaml.safe_load(shipped)) == config.Config()


def test_every_key_is_documented() -> None:
    text = config.render_yaml()
    assert "#  \n" not in text and "# \n" not in text


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    assert config.load(tmp_path / "none.yaml") == config.Config()


@pytest.mark.parametrize(
    ("raw", "key", "words"),
    [
        ({"bogus": 1}, "bogus", "unknown key"),
        ({"installer": {"timeout": 5}}, "installer.timeout", "unknown key"),
        ({"installer": {"timeout_s": "10"}}, "installer.timeout_s", "expected integer"),
        ({"installer": {"offline": "yes"}}, "installer.offline", "expected boolean"),
        ({"paths": {"state_dir": "relative/dir"}}, "paths.state_dir", "absolute path"),
        ({"ports": {"rest": [9000, 8000]}}, "ports.rest", "low <= high"),
        ({"ports": {"rest": "8000-9000"}}, "ports.rest", "expected list of integer"),
        ({"installer": {"kind": "conda"}}, "installer.kind", "auto, uv, pip"),
        ({"workers": 0}, "workers", "positive"),
        ({"listen": []}, "listen", "expected a mapping"),
        ({"installer": {"extra_index_urls": [1]}}, "installer.extra_index_urls[0]",
         "expected string"),
    ],
)
def test_bad_values_name_the_key(raw: dict, key: str, words: str) -> None:
    with pytest.raises(config.ConfigError) as exc:
        config.from_dict(raw)
    assert exc.value.field == key
    assert words in exc.value.message
    assert exc.value.message.startswith(key)


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "par.yaml"
    path.write_text("installer: [unclosed\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(path)


def test_values_are_converted(tmp_path: Path) -> None:
    path = tmp_path / "par.yaml"
    path.write_text("paths:\n  state_dir: /srv/par\nlimits:\n  download_timeout_s: 5\n")
    cfg = config.load(path)
    assert cfg.paths.state_dir == Path("/srv/par")
    assert layout.venvs(cfg) == Path("/srv/par/venvs")
    assert cfg.limits.download_timeout_s == 5.0 and isinstance(cfg.limits.download_timeout_s, float)
