"""grpc-agent's REST surface: GET /hello reports the grpcio version actually imported."""

import grpc


def mount(app) -> None:
    """Add GET /hello to `app` (a fastapi.FastAPI)."""

    @app.get("/hello")
    def hello() -> dict:
        return {"grpcio": grpc.__version__}
