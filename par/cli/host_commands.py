"""The commands about the host: venvs, the installer, packing, doctor and version."""

from __future__ import annotations

from pathlib import Path

import click

from par import __version__
from par.cli import doctor as doctor_checks
from par.cli import views
from par.cli.app import EXIT_FAILED, App, json_option
from par.cli.deploy_source import folder_manifest, sha256_file
from par.cli.render import show
from par.errors import ParError


@click.group()
def venv() -> None:
    """List, prune and prewarm the per-agent venvs."""


@venv.command("list")
@json_option
@click.pass_obj
def venv_list(app: App, as_json: bool) -> None:
    """List venvs: name, size, last use, agents using it."""
    show(as_json, app.client().venvs(), views.venvs)


@venv.command("prune")
@json_option
@click.pass_obj
def venv_prune(app: App, as_json: bool) -> None:
    """Delete venvs no current deployment uses (least recently used first, within the budget)."""
    show(as_json, app.client().prune_venvs(), views.pruned)


@venv.command("prewarm")
@click.option("-r", "--requirements", "requirements", required=True, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="requirements.txt whose packages go into the shared cache.")
@json_option
@click.pass_obj
def venv_prewarm(app: App, requirements: Path, as_json: bool) -> None:
    """Fill the shared cache for a requirements file, so the next build needs no network."""
    data = app.client().prewarm(requirements.read_text(encoding="utf-8"))
    show(as_json, data, lambda d: views.prewarmed(d, requirements))


@click.group()
def installer() -> None:
    """Manage the installer pard builds venvs with (uv, else pip)."""


@installer.command("install-uv")
@click.option("--version", "version", default=None, metavar="X.Y.Z",
              help="The uv release to install (default: installer.uv_version).")
@json_option
@click.pass_obj
def installer_install_uv(app: App, version: str | None, as_json: bool) -> None:
    """Fetch uv from the configured package index into PAR's tools folder.

    pard does this by itself in the background when installer.kind is auto and
    no uv is found (Debian 12 has no uv package); this command fetches it now,
    or another version.  Without uv, PAR builds venvs with pip (slower).
    """
    show(as_json, app.client().install_uv(version), views.uv_installed)


@click.group()
def token() -> None:
    """The bearer token TCP clients send (listen.token_file)."""


@token.command("create")
@click.option("--force", is_flag=True, help="Replace an existing token.")
@click.pass_obj
def token_create(app: App, force: bool) -> None:
    """Write a new random token to listen.token_file (root-only, 0600) and print it.

    Give the printed token to the control plane; restart pard (systemctl restart
    par) for a replaced token to take effect.
    """
    import secrets

    from par.fsutil import atomic_write_text

    path = app.config().listen.token_file
    if path.exists() and not force:
        raise ParError("token_exists", f"{path} already holds a token; --force replaces it",
                       "token_file")
    value = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, value + "\n", mode=0o600)
    click.echo(value)


@click.command()
@click.argument("folder", metavar="DIR",
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Where to write the package [default: ./NAME-VERSION.apkg].")
@json_option
def pack(folder: Path, output: Path | None, as_json: bool) -> None:
    """Pack an agent folder into an .apkg (no pard needed)."""
    from par.pack import pack_folder  # lazily: the other commands never need the packer

    if output is None:
        manifest = folder_manifest(folder)
        output = Path(f"{manifest.name}-{manifest.version}.apkg")
    package = pack_folder(folder, output)
    data = {"path": str(package), "sizeBytes": package.stat().st_size,
            "sha256": sha256_file(package)}
    show(as_json, data, lambda d: views.packed(d, folder))


@click.command()
@json_option
@click.pass_obj
def doctor(app: App, as_json: bool) -> None:
    """Check the host and say what to fix.

    Checks systemd, pard, the config, the directories, the installer, free
    disk and Python. Each line is ok, warn or fail, with what to do. Exit 1 if any check fails.
    """
    checks = doctor_checks.run_checks(app)
    data = doctor_checks.report(checks)
    show(as_json, data, lambda _: [c.line() for c in checks])
    if not data["ok"]:
        raise click.exceptions.Exit(EXIT_FAILED)


@click.command("version")
@json_option
@click.pass_obj
def version_(app: App, as_json: bool) -> None:
    """Show parctl's version and, when it answers, pard's."""
    try:
        pard: str | None = app.client().daemon_health().get("version")
        problem = None
    except ParError as err:
        pard, problem = None, err.message
    show(as_json, {"parctl": __version__, "pard": pard}, lambda d: views.versions(d, problem))


COMMANDS: tuple[click.Command, ...] = (venv, installer, token, pack, doctor, version_)
