"""`serve`: the OpenAI-compatible API and the web chat page over one checkpoint."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from typing import Annotated

import typer

from reasoning_llama.cli import options
from reasoning_llama.cli.model_dir import ModelDir, resolve_model_dir
from reasoning_llama.errors import ConfigError

log = logging.getLogger(__name__)


def serve(
    checkpoint: ModelDir,
    host: Annotated[str, typer.Option(help="Address to bind; loopback by default.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="REASONING_LLAMA_API_KEY",
            help="Require 'Authorization: Bearer KEY' on /v1 (or set REASONING_LLAMA_API_KEY).",
        ),
    ] = None,
    max_concurrency: Annotated[int, typer.Option(help="Requests decoded together (engine batch slots).")] = 8,
    max_queue: Annotated[int, typer.Option(help="Requests waiting beyond the slots before a 503.")] = 32,
    model_name: Annotated[
        str | None, typer.Option(help="The model id clients send (default: the checkpoint's folder name).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    quantize: options.Quantize = None,
    compile_step: options.Compile = None,
    max_body_bytes: Annotated[
        int, typer.Option(help="Largest request body accepted (413 above).")
    ] = 1_000_000,
    max_messages: Annotated[int, typer.Option(help="Most messages in one chat request.")] = 256,
    max_chars: Annotated[
        int, typer.Option(help="Most characters over all messages of one request.")
    ] = 200_000,
    default_max_tokens: Annotated[
        int,
        typer.Option(
            help="Tokens generated when a chat request sets no max_tokens, or a completion sets it to null "
            "(left out, a completion gets OpenAI's 16); capped by the context."
        ),
    ] = 512,
) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics and the chat page at /."""
    import uvicorn

    from reasoning_llama.generation import Engine
    from reasoning_llama.server import Server, ServerSettings, create_app

    if max_concurrency < 1:
        raise ConfigError(f"--max-concurrency must be >= 1, got {max_concurrency}")
    settings = ServerSettings(
        host=host,
        port=port,
        api_key=api_key,
        model_name=model_name or checkpoint.resolve().name,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        max_messages=max_messages,
        max_total_chars=max_chars,
        default_max_tokens=default_max_tokens,
    )
    listener = _bind(host, port)  # fail with a clear message before the model loads
    engine = Engine.from_checkpoint(
        resolve_model_dir(checkpoint),
        device=device,
        max_batch_size=max_concurrency,
        quantize=quantize,
        compile=compile_step,
    )
    if api_key is None and not _is_loopback(host):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    app = create_app(engine, settings)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"serving {settings.model_name} on http://{shown}:{listener.getsockname()[1]}/", err=True)
    server = Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    server.run(sockets=[listener])


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is already in use; choose another with --port"
            ) from None
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(app: typer.Typer) -> None:
    app.command()(serve)
