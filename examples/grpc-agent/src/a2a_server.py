"""grpc-agent's A2A surface: a gRPC server with one generic echo method.

`/par.example.Echo/Echo` returns the request bytes unchanged (no .proto
needed), enough to show that the server answers with the pinned grpcio.
"""

import os
from concurrent import futures

import grpc

ECHO_METHOD = "/par.example.Echo/Echo"


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def create_grpc_server(port: int, host: str | None = None) -> grpc.Server:
    """A server listening on host:port, not started (the agent host calls .start()).

    `host` defaults to PAR_BIND_ADDRESS, the address the agent host serves and
    probes the surfaces on (127.0.0.1 unless the PAR config says otherwise).
    """
    host = host or os.environ.get("PAR_BIND_ADDRESS", "127.0.0.1")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "par.example.Echo",
        {"Echo": grpc.unary_unary_rpc_method_handler(_echo)},
    )
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise RuntimeError(f"cannot listen on {host}:{port}")
    return server
