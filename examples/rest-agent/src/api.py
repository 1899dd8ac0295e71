"""rest-agent's REST surface: the agent host calls mount(app) with its FastAPI app."""


def mount(app) -> None:
    """Add GET /hello to `app` (a fastapi.FastAPI)."""

    @app.get("/hello")
    def hello() -> dict:
        return {"message": "hello from rest-agent"}
