"""The OpenAI-compatible HTTP server and the web chat page (`reasoning-llama serve`)."""

from reasoning_llama.server.app import Server, begin_shutdown, create_app
from reasoning_llama.server.settings import ServerSettings

__all__ = ["Server", "ServerSettings", "begin_shutdown", "create_app"]
