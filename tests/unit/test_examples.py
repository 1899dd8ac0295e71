"""The example agents pack, extract and parse; their effective requirements follow the rules.

Also `pack_folder` itself: deterministic bytes, skipped folders, refusals.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import types
import zipfile
from pathlib import Path

import pytest

from par.errors import ParError
from par.extract import extract_package
from par.fetch import fetch_package
from par.manifest import load_manifest, read_dotenv
from par.pack import pack_folder
from par.requirements import effective_requirements
from tests.unit.apkg_factory import make_cfg

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

# name -> (surfaces, effective requirements text, what PAR added)
EXPECTED = {
    "hello-agent": ((), "", ()),
    "rest-agent": (("rest", "ui"), "fastapi\nuvicorn\n", ()),
    "grpc-agent": (("rest", "a2a"), "grpcio==1.73.1\nprotobuf\nfastapi\nuvicorn\n",
                   ("fastapi", "uvicorn")),
}


def deploy_files(tmp_path: Path, name: str) -> Path:
    """Pack the example, fetch it as a local file, extract it; return the extracted root."""
    cfg = make_cfg(tmp_path)
    apkg = pack_folder(EXAMPLES / name, tmp_path / f"{name}.apkg")
    fetched = fetch_package(cfg, name, "0.1.0", f"file://{apkg}", None, False, None)
    return extract_package(cfg, name, "0.1.0", fetched.path, check=load_manifest)


def load_module(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeApp:
    """Records `@app.get(path)` routes the way FastAPI's decorator is used."""

    def __init__(self) -> None:
        self.routes: dict[str, object] = {}

    def get(self, path: str):
        def register(fn):
            self.routes[path] = fn
            return fn
        return register


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_packs_parses_and_has_expected_requirements(tmp_path: Path, name: str) -> None:
    root = deploy_files(tmp_path, name)
    manifest = load_manifest(root)
    surfaces, text, added = EXPECTED[name]
    assert manifest.name == name and manifest.version == "0.1.0"
    assert manifest.entrypoint == "main:handler"
    assert manifest.display_name and manifest.description
    assert manifest.surfaces == surfaces
    assert manifest.extra == {}
    assert (root / "src" / "main.py").is_file()
    req = effective_requirements(root, manifest, allow_index_options=False)
    assert (req.text, req.added) == (text, added)
    assert req.sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert read_dotenv(root) == {}


def test_hashes_differ_between_examples(tmp_path: Path) -> None:
    hashes = set()
    for name in EXPECTED:
        root = deploy_files(tmp_path / name, name)
        hashes.add(effective_requirements(root, load_manifest(root), False).sha256)
    assert len(hashes) == 3


def test_hello_agent_handler_and_start_line(tmp_path: Path, capsys) -> None:
    root = deploy_files(tmp_path, "hello-agent")
    assert not (root / "requirements.txt").exists()
    main = load_module(root / "src" / "main.py", "example_hello_main")
    assert "hello-agent: loaded" in capsys.readouterr().out
    assert main.handler({"name": "PAR"}) == {"message": "Hello, PAR!", "agent": "hello-agent"}
    assert main.handler({})["message"] == "Hello, world!"


def test_rest_agent_mounts_hello_and_has_ui(tmp_path: Path) -> None:
    root = deploy_files(tmp_path, "rest-agent")
    manifest = load_manifest(root)
    assert (root / manifest.ui_path / "index.html").is_file()
    module, func = manifest.rest_entry.split(":")
    api = load_module(root / "src" / f"{module}.py", "example_rest_api")
    app = FakeApp()
    getattr(api, func)(app)
    assert app.routes["/hello"]() == {"message": "hello from rest-agent"}


def test_grpc_agent_reports_the_grpcio_it_imported(tmp_path: Path, monkeypatch) -> None:
    root = deploy_files(tmp_path, "grpc-agent")
    manifest = load_manifest(root)
    calls: list[tuple] = []

    class FakeServer:
        def add_generic_rpc_handlers(self, handlers):
            calls.append(("handlers", len(handlers)))

        def add_insecure_port(self, address):
            calls.append(("port", address))
            return int(address.rsplit(":", 1)[1])

        def start(self):  # the agent host starts it, never the factory
            calls.append(("start",))

    # A stand-in grpc module: the tests run without grpcio installed.
    grpc = types.ModuleType("grpc")
    grpc.__version__ = "1.73.1-test"
    grpc.Server = FakeServer
    grpc.ServicerContext = object
    grpc.server = lambda executor: FakeServer()
    grpc.unary_unary_rpc_method_handler = lambda fn: fn
    grpc.method_handlers_generic_handler = lambda service, methods: (service, methods)
    monkeypatch.setitem(sys.modules, "grpc", grpc)
    monkeypatch.setenv("PAR_BIND_ADDRESS", "127.0.0.2")

    module, func = manifest.rest_entry.split(":")
    app = FakeApp()
    getattr(load_module(root / "src" / f"{module}.py", "example_grpc_api"), func)(app)
    assert app.routes["/hello"]() == {"grpcio": "1.73.1-test"}

    module, func = manifest.a2a_service.split(":")
    a2a = load_module(root / "src" / f"{module}.py", "example_grpc_a2a")
    server = getattr(a2a, func)(50123)
    assert isinstance(server, FakeServer)
    assert calls == [("handlers", 1), ("port", "127.0.0.2:50123")]
    assert a2a._echo(b"ping", None) == b"ping"


# --- pack_folder ------------------------------------------------------------------

def test_pack_is_deterministic_and_skips_caches(tmp_path: Path) -> None:
    src = tmp_path / "agent"
    (src / "src" / "__pycache__").mkdir(parents=True)
    (src / ".git").mkdir()
    (src / "agent.yaml").write_text("name: packed\nversion: '1'\n")
    (src / "src" / "main.py").write_text("def handler(c):\n    return c\n")
    (src / "src" / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"\0")
    (src / "src" / "stale.pyc").write_bytes(b"\0")
    (src / ".git" / "HEAD").write_text("ref: x\n")
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    first = pack_folder(src, tmp_path / "one.apkg").read_bytes()
    (src / "src" / "main.py").touch()  # a newer mtime must not change the bytes
    second = pack_folder(src, tmp_path / "two.apkg").read_bytes()
    assert first == second
    with zipfile.ZipFile(tmp_path / "one.apkg") as zf:
        assert zf.namelist() == ["agent.yaml", "run.sh", "src/main.py"]
        assert zf.getinfo("run.sh").external_attr >> 16 == 0o100755
        assert zf.getinfo("agent.yaml").external_attr >> 16 == 0o100644
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_pack_skips_local_venvs_node_modules_and_parignore(tmp_path: Path) -> None:
    src = tmp_path / "agent"
    (src / "src").mkdir(parents=True)
    (src / "agent.yaml").write_text("name: packed\nversion: '1'\n")
    (src / "src" / "main.py").write_text("def handler(c):\n    return c\n")
    # a local venv as `python -m venv .venv` makes it: lib64 is a symbolic link
    (src / ".venv" / "lib").mkdir(parents=True)
    (src / ".venv" / "lib64").symlink_to("lib")
    (src / "venv" / "bin").mkdir(parents=True)
    (src / "venv" / "bin" / "python").symlink_to("/usr/bin/python3")
    (src / "node_modules" / "x").mkdir(parents=True)
    (src / "node_modules" / "x" / "index.js").write_text("")
    (src / "data").mkdir()
    (src / "data" / "big.bin").write_bytes(b"\0" * 10)
    (src / "data" / "keep.bin").write_bytes(b"\1")
    (src / "notes.log").write_text("x")
    (src / "src" / "debug.log").write_text("x")
    (src / ".parignore").write_text("# not the agent\n*.log\ndata/*\n!data/keep.bin\n")
    pack_folder(src, tmp_path / "out.apkg")
    with zipfile.ZipFile(tmp_path / "out.apkg") as zf:
        assert zf.namelist() == ["agent.yaml", "data/keep.bin", "src/main.py"]


def test_pack_still_refuses_a_link_it_would_pack(tmp_path: Path) -> None:
    src = tmp_path / "agent"
    (src / "src").mkdir(parents=True)
    (src / "agent.yaml").write_text("name: packed\nversion: '1'\n")
    (src / "src" / "config.json").symlink_to("/etc/hostname")
    with pytest.raises(ParError) as info:
        pack_folder(src, tmp_path / "out.apkg")
    assert (info.value.code, info.value.field) == ("pack_symlink", "src/config.json")


def test_pack_output_inside_the_folder_is_not_packed_into_itself(tmp_path: Path) -> None:
    src = tmp_path / "agent"
    src.mkdir()
    (src / "agent.yaml").write_text("name: packed\nversion: '1'\n")
    pack_folder(src, src / "dist" / "packed.apkg")
    pack_folder(src, src / "dist" / "packed.apkg")
    with zipfile.ZipFile(src / "dist" / "packed.apkg") as zf:
        assert zf.namelist() == ["agent.yaml"]


def test_pack_validates_the_manifest_first(tmp_path: Path) -> None:
    src = tmp_path / "agent"
    src.mkdir()
    (src / "agent.yaml").write_text("name: Not Valid\nversion: '1'\n")
    with pytest.raises(ParError) as info:
        pack_folder(src, tmp_path / "out.apkg")
    assert (info.value.code, info.value.field) == ("manifest_invalid", "name")
    assert not (tmp_path / "out.apkg").exists()


def test_pack_refuses_symlinks(tmp_path: Path) -> None:
    src = tmp_path / "agent"
    src.mkdir()
    (src / "agent.yaml").write_text("name: packed\nversion: '1'\n")
    (src / "secret").symlink_to("/etc/hostname")
    with pytest.raises(ParError) as info:
        pack_folder(src, tmp_path / "out.apkg")
    assert (info.value.code, info.value.field) == ("pack_symlink", "secret")
    assert [p.name for p in tmp_path.iterdir()] == ["agent"]


def test_pack_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ParError) as info:
        pack_folder(tmp_path / "nope", tmp_path / "out.apkg")
    assert info.value.code == "pack_invalid"
