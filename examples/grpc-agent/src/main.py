"""grpc-agent: the handler behind POST /invoke reports the grpcio it runs with."""

import grpc

print(f"grpc-agent: loaded with grpcio {grpc.__version__}", flush=True)


def handler(context: dict) -> dict:
    """Say which grpcio this agent imported (its venv's, not the runtime's)."""
    return {"agent": "grpc-agent", "grpcio": grpc.__version__}
