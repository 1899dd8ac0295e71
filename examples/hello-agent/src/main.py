"""hello-agent: answers POST /invoke with a greeting (standard library only)."""

import os
import sys

# Printed when the agent host imports this module: the line shows up in the
# journal of par-agent@<id>.service, so a test can tell the agent started.
print(f"hello-agent: loaded (python {sys.version.split()[0]})", flush=True)


def handler(context: dict) -> dict:
    """Greet `context["name"]` (default "world") with the GREETING from agent.yaml."""
    name = context.get("name") or "world"
    greeting = os.environ.get("GREETING", "Hello")
    return {"message": f"{greeting}, {name}!", "agent": "hello-agent"}
