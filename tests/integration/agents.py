"""Small agent packages for integration tests (built as files, packed by the test)."""

from __future__ import annotations

import textwrap


def manifest(name: str, version: str = "1.0.0", extra: str = "") -> str:
    return f"name: {name}\nversion: {version}\nentrypoint: main:handler\n{extra}"


# POST /invoke {"op": ..., "path": ...} tries a file operation as the agent's user.
PROBE_MAIN = textwrap.dedent('''
    import os, pwd

    def handler(ctx):
        op, path = ctx.get("op"), ctx.get("path")
        try:
            if op == "whoami":
                return {"ok": True, "uid": os.getuid(),
                        "user": pwd.getpwuid(os.getuid()).pw_name, "home": os.environ.get("HOME")}
            if op == "write":
                with open(path, "w") as fh:
                    fh.write(ctx.get("data", "x"))
                return {"ok": True}
            if op == "read":
                with open(path) as fh:
                    return {"ok": True, "data": fh.read()}
            if op == "listdir":
                return {"ok": True, "entries": sorted(os.listdir(path))}
            return {"ok": False, "error": "unknown op"}
        except OSError as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc.strerror}"}
''')


def probe(name: str) -> dict[str, str]:
    return {"agent.yaml": manifest(name), "src/main.py": PROBE_MAIN}


def import_error(name: str) -> dict[str, str]:
    return {"agent.yaml": manifest(name),
            "src/main.py": "import no_such_module_par_test\n\ndef handler(ctx):\n    return {}\n"}


def crash_after_ready(name: str) -> dict[str, str]:
    """Serves, then dies 1 s later: a crash loop that systemd's start limit must end."""
    return {"agent.yaml": manifest(name), "src/main.py": textwrap.dedent('''
        import os, threading
        threading.Timer(1.0, os._exit, args=(7,)).start()
        def handler(ctx):
            return {}
    ''')}


def sigterm_blocker(name: str) -> dict[str, str]:
    """Blocks SIGTERM process-wide at import: only SIGKILL at TimeoutStopSec ends it."""
    return {"agent.yaml": manifest(name), "src/main.py": textwrap.dedent('''
        import signal
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        def handler(ctx):
            return {}
    ''')}


def never_ready(name: str) -> dict[str, str]:
    """Its import never finishes: READY never comes."""
    return {"agent.yaml": manifest(name),
            "src/main.py": "import time\ntime.sleep(3600)\n\ndef handler(ctx):\n    return {}\n"}


def slow_start(name: str, seconds: float) -> dict[str, str]:
    return {"agent.yaml": manifest(name),
            "src/main.py": f"import time\ntime.sleep({seconds})\n\n"
                           "def handler(ctx):\n    return {}\n"}


def with_requirements(name: str, requirements: str, version: str = "1.0.0") -> dict[str, str]:
    return {"agent.yaml": manifest(name, version), "requirements.txt": requirements,
            "src/main.py": "def handler(ctx):\n    return {'ok': True}\n"}
