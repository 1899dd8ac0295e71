"""rest-agent: the handler behind POST /invoke."""

print("rest-agent: loaded", flush=True)


def handler(context: dict) -> dict:
    """Echo the context back, so a caller sees what the agent received."""
    return {"agent": "rest-agent", "received": context}
