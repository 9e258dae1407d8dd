"""`heavylift serve MODEL`: plan for this machine as `run` does, then serve the model over OpenAI's HTTP API.

Everything that can be refused is refused before the port opens: the arguments, the plan (the same
refusal of a plan that does not fit), the tokenizer, the address. Then the server listens at once and
answers /health with 503 while the weights load in the background; the offload guard runs as the
weights land, and its refusal stops the server with the same one line as `run`. Ctrl-C lets requests in
flight finish for a few seconds, then says "stopped" and exits 0.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from heavylift.commands.run import ADAPTER_HELP, RUN_GPUS_HELP, load_session
from heavylift.defaults import (DEFAULT_CONTEXT_TOKENS, PREFILL_CHUNK_TOKENS, SERVE_DRAIN_SECONDS, SERVE_HOST,
                                SERVE_MAX_QUEUE, SERVE_MAX_SEQS, SERVE_MIN_PREFILL_CHUNK_TOKENS, SERVE_PORT)
from heavylift.errors import InvalidArgumentError
from heavylift.schemes import QUANT_CHOICES

AUTO = "auto"
LISTEN_BACKLOG = 2048  # connections the kernel queues before the server accepts them (uvicorn's default)
STOPPED = "stopped"


def parse_max_seqs(value: str) -> int | None:
    """--max-seqs: a number of sequences, or None for auto (the planner's answer)."""
    if value == AUTO:
        return None
    if value.isdigit() and 1 <= int(value) <= SERVE_MAX_SEQS:
        return int(value)
    raise InvalidArgumentError(f"--max-seqs must be {AUTO} or a whole number from 1 to {SERVE_MAX_SEQS}, not {value!r}")


def _check_libraries() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise InvalidArgumentError(f"heavylift serve needs {e.name}: pip install 'heavylift[serve]'") from None


def plan_slots(model: str, quant: str, gpus, context, max_seqs: int | None, allow_offload: bool, engine: str,
               adapter: Path | None = None):
    """The model planned as a server of `max_seqs` sequences of `context` tokens, each with its KV cache slot:
    (Prepared, sequences). With auto, as many sequences as the planner fits beside the weights of the
    precision it picks for one sequence (SchemePlan.max_concurrent_sequences); the LoRA adapter in `adapter`
    checked and counted."""
    from heavylift.api import prepare

    if max_seqs is not None:
        return prepare(model, quant, gpus, context, max_seqs, allow_offload, engine=engine, serve=True,
                       adapter=adapter), max_seqs
    one = prepare(model, quant, gpus, context, 1, allow_offload, engine=engine, serve=True, adapter=adapter)
    fits = one.scheme.max_concurrent_sequences
    if fits <= 1:  # one sequence (or, offloaded, not even one on the GPUs): the plan just made
        return one, 1
    return prepare(model, one.scheme.quant, gpus, context, fits, allow_offload, engine=engine, serve=True,
                   adapter=adapter), fits


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening, or a one-line refusal that says what to change."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror:
        raise InvalidArgumentError(f"--host {host} is not an address of this machine; use 127.0.0.1, or "
                                   "0.0.0.0 for every interface") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        raise InvalidArgumentError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or "
                                   "stop what holds it") from None
    return sock


def beyond_loopback(sock: socket.socket) -> bool:
    return not ipaddress.ip_address(sock.getsockname()[0]).is_loopback


def serve(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Local folder, catalog name backed by a downloaded copy, or hub id."),
    quant: str = typer.Option("auto", "--quant", help=f"auto (the plan's pick) or one of: {', '.join(QUANT_CHOICES)}."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help=RUN_GPUS_HELP),
    context: Optional[int] = typer.Option(None, "--context", help=f"Tokens of prompt + output per sequence; default "
                                          f"{DEFAULT_CONTEXT_TOKENS}, or the model's maximum when shorter."),
    max_seqs: str = typer.Option(AUTO, "--max-seqs", help="Sequences decoded together, each with a KV cache slot "
                                 "of --context tokens; auto: as many as the plan fits beside the weights."),
    prefill_chunk: int = typer.Option(PREFILL_CHUNK_TOKENS, "--prefill-chunk", min=SERVE_MIN_PREFILL_CHUNK_TOKENS,
                                      max=PREFILL_CHUNK_TOKENS,
                                      help="Tokens of a prompt prefilled at a time, between two decode steps, "
                                      "where it cannot ride inside them: one asking for its own logprobs (echo), "
                                      "or any on the transformers runtime. Smaller keeps the streams' token gaps "
                                      "shorter, larger gives more throughput."),
    max_queue: int = typer.Option(SERVE_MAX_QUEUE, "--max-queue", min=0,
                                  help="Requests that may wait for a slot; more are answered 429."),
    host: str = typer.Option(SERVE_HOST, "--host", help="Address to listen on; 0.0.0.0 for every interface."),
    port: int = typer.Option(SERVE_PORT, "--port", min=1, max=65535),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="HEAVYLIFT_API_KEY",
                                          help="Key the /v1 routes require as 'Authorization: Bearer KEY'."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name",
                                                    help="The model's name in the API (default: MODEL as typed)."),
    allow_offload: bool = typer.Option(False, "--allow-offload", help="Let layers that do not fit stay in CPU RAM."),
    engine: str = typer.Option("auto", "--engine",
                               help="auto (the fast engine where it runs, else transformers), fast, or transformers."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
) -> None:
    """Load MODEL exactly as planned for this machine and serve it over OpenAI's HTTP API."""
    from heavylift.finetune.adapter import adapter_engine

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    seqs = parse_max_seqs(max_seqs)
    _check_libraries()
    if adapter is not None:
        engine, note = adapter_engine(engine, adapter)
    prepared, seqs = plan_slots(model, quant, gpus, context, seqs, allow_offload, engine, adapter)
    if adapter is not None:
        err.print(escape(note))
    tokenizer = prepared.tokenizer  # a missing tokenizer is refused before the port opens
    for warning in prepared.plan.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}")
    sock = listen(host, port)
    if beyond_loopback(sock) and not api_key:
        err.print(f"[yellow]warning:[/] listening on {host}:{port} without --api-key: anyone who reaches this "
                  "port can use the model")
    verbose = bool(ctx.find_root().params.get("verbose"))
    _serve(err, prepared, tokenizer, seqs, max_queue, prefill_chunk, sock, api_key, served_model_name or model,
           verbose, adapter)


def _serve(err: Console, prepared, tokenizer, seqs: int, max_queue: int, prefill_chunk: int, sock: socket.socket,
           api_key, name: str,
           verbose: bool, adapter: Path | None = None) -> None:
    import uvicorn

    from heavylift.serve.app import ModelCard, create_app

    card = ModelCard(name, tokenizer, prepared.plan.context, prepared.source.architecture.vocab_size)
    failure: list[BaseException] = []

    def on_loaded(error: BaseException | None) -> None:
        if error is None:
            err.print(f"ready: {name} in {prepared.scheme.quant}, {seqs} sequence{'s' * (seqs != 1)} of "
                      f"{card.context} tokens")
            return
        failure.append(error)
        server.should_exit = True

    app = create_app(card, lambda: _scheduler(err, prepared, seqs, max_queue, prefill_chunk, adapter), api_key,
                     on_loaded=on_loaded)
    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose, lifespan="on",
                            timeout_graceful_shutdown=SERVE_DRAIN_SECONDS)
    server = uvicorn.Server(config)
    address = sock.getsockname()
    err.print(f"serving {name} at http://{host_label(address[0])}:{address[1]}/v1 (Ctrl-C stops); loading")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn stops on Ctrl-C, drains, then raises it again
        pass
    app.state.backend.stop(0)  # a second Ctrl-C skips the app's own shutdown: stop the scheduler here
    if failure:
        raise failure[0]
    err.print(STOPPED)


def host_label(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _scheduler(err: Console, prepared, seqs: int, max_queue: int, prefill_chunk: int, adapter: Path | None = None):
    """Load the weights by the plan (the offload guard refuses what landed off it), with the LoRA adapter
    over them where one is given, and put the scheduler, not yet started, over them."""
    from heavylift.serve.scheduler import Scheduler

    session = load_session(err, prepared, adapter)
    return Scheduler(session, seqs, max_queue, prefill_chunk=prefill_chunk)
