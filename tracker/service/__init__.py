"""The tracker as an HTTP service: ``create_app`` (ASGI, FastAPI) and ``serve`` (uvicorn, signals)."""

from .app import create_app
from .server import ForcedShutdown, serve
from .settings import ServiceSettings

__all__ = ["ForcedShutdown", "ServiceSettings", "create_app", "serve"]
