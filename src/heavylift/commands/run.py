"""`heavylift run MODEL --prompt TEXT`: plan for this machine, check the prompt, load by the plan, stream.

Everything cheap is checked before any weight is read: the arguments, the plan, the tokenizer, the chat
template --chat needs, and the prompt's length against --context.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from heavylift.defaults import DEFAULT_CONTEXT_TOKENS, DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P
from heavylift.errors import HeavyliftError, InvalidArgumentError
from heavylift.schemes import QUANT_CHOICES

INTERRUPTED = "interrupted"  # the finish_reason of a generation stopped by Ctrl-C, and the notice
WRAPPED_NOTE = "prompt wrapped in the model's chat template; --raw to send it as is"
ADAPTER_HELP = ("A LoRA adapter folder (`heavylift finetune --out`, or one of its checkpoints) applied over the "
                "base in --quant; transformers then runs the model.")
RUN_GPUS_HELP = ("Use only some of this machine's GPUs, or less of their memory: the first N, each no larger "
                 "than described (e.g. 1xH100, 2x40GiB). Plans for other machines: `heavylift plan --gpus`.")


def _check_arguments(prompt: str | None, chat: bool, raw: bool) -> None:
    if prompt is None and not chat:
        raise InvalidArgumentError("give --prompt TEXT, or --chat for a conversation")
    if prompt == "":
        raise InvalidArgumentError("--prompt is empty; give the text to continue")
    if raw and chat:
        raise InvalidArgumentError("--raw sends one prompt as it is, but --chat needs the chat template; drop one")


def _check_prompt(prepared, prompt: str | None, system: str | None, chat: bool, raw: bool,
                  max_new_tokens: int) -> int:
    """Load the tokenizer and check the prompt against it and the plan's context, before any weight loads:
    the prompt's token count."""
    from heavylift.runtime.session import check_length, encode

    tokenizer = prepared.tokenizer
    if chat and not getattr(tokenizer, "chat_template", None):
        raise InvalidArgumentError(f"--chat needs a chat template, and {prepared.source.name}'s tokenizer has none; "
                                   "continue a text with --prompt instead")
    if prompt is None:
        return 0
    ids = encode(tokenizer, [{"role": "user", "content": prompt}] if chat else prompt, system, raw)
    check_length(len(ids), max_new_tokens, prepared.plan.context)
    return len(ids)


def _summary(session, record) -> str:
    gpus = [m for m in session.remeasure() if m.peak_bytes is not None]  # the CPU keeps no allocator peak
    peaks = ", ".join(f"{m.device} {m.peak_bytes / 1e9:.2f} GB (plan {m.planned_bytes / 1e9:.2f})" for m in gpus)
    return (f"{record.prompt_tokens} prompt tokens, prefill {record.prefill_tok_s:.1f} tok/s, "
            f"{record.generated_tokens} generated at {record.decode_tok_s:.1f} tok/s" + (f", peak {peaks}" if peaks else ""))


def _stream_to_terminal(session, prompt, system, raw: bool, sampling: dict):
    """Write the tokens to stdout as they come; the whole generation as one Record. On Ctrl-C or an error,
    the line is ended before it goes on up."""
    from heavylift.runtime.session import join

    records = []
    try:
        for record in session.stream(prompt, system, raw, **sampling):
            sys.stdout.write(record.text)
            sys.stdout.flush()
            records.append(record)
    except (KeyboardInterrupt, HeavyliftError):
        sys.stdout.write("\n")
        sys.stdout.flush()
        raise
    sys.stdout.write("\n")
    return join(records)


def _chat(session, first: str | None, system: str | None, sampling: dict, err: Console) -> None:
    """Turns until /exit or end of input; Ctrl-C stops a reply, and at the prompt leaves."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    err.print("chat: /reset clears the history, /exit leaves")
    while True:
        line, first = (first, None) if first is not None else (_read_line(), None)
        if line is None or line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = _stream_to_terminal(session, history, None, False, sampling)
        except KeyboardInterrupt:
            err.print(escape(f"[{INTERRUPTED}]"))
            history.pop()
            continue
        except InvalidArgumentError as e:  # the conversation outgrew --context
            err.print(f"[bold red]error:[/] {escape(str(e))}; /reset starts afresh")
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply.text})


def _read_line() -> str | None:
    try:
        return input(">>> ")
    except EOFError:
        return None


def _generate_json(session, prompt, system, raw: bool, sampling: dict, prompt_tokens: int) -> None:
    """One JSON object on stdout; on Ctrl-C, what was generated so far, finish_reason "interrupted"."""
    from heavylift.runtime.session import join

    records = []
    try:
        for record in session.stream(prompt, system, raw, **sampling):
            records.append(record)
    except KeyboardInterrupt:
        stopped = replace(join(records, prompt_tokens), finish_reason=INTERRUPTED)
        typer.echo(json.dumps(_json(session, stopped), indent=2))
        raise
    typer.echo(json.dumps(_json(session, join(records, prompt_tokens)), indent=2))


def run(
    model: str = typer.Argument(..., help="Local folder, catalog name backed by a downloaded copy, or hub id."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to continue (or the first chat turn)."),
    quant: str = typer.Option("auto", "--quant", help=f"auto (the plan's pick) or one of: {', '.join(QUANT_CHOICES)}."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help=RUN_GPUS_HELP),
    context: Optional[int] = typer.Option(None, "--context", help=f"Tokens of prompt + output to plan for; default "
                                          f"{DEFAULT_CONTEXT_TOKENS}, or the model's maximum when shorter."),
    max_new_tokens: int = typer.Option(DEFAULT_MAX_NEW_TOKENS, "--max-new-tokens"),
    temperature: float = typer.Option(DEFAULT_TEMPERATURE, "--temperature", help="0 means greedy."),
    top_p: float = typer.Option(DEFAULT_TOP_P, "--top-p"),
    top_k: int = typer.Option(DEFAULT_TOP_K, "--top-k", help="0 keeps every token."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    chat: bool = typer.Option(False, "--chat", help="Interactive multi-turn chat with the tokenizer's template."),
    system: Optional[str] = typer.Option(None, "--system", help="System message for chat templates."),
    raw: bool = typer.Option(False, "--raw", help="Send --prompt as it is, not wrapped in the chat template."),
    allow_offload: bool = typer.Option(False, "--allow-offload", help="Let layers that do not fit stay in CPU RAM."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
    engine: str = typer.Option("auto", "--engine",
                               help="auto (the fast engine where it runs, else transformers), fast, or transformers."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
) -> None:
    """Load MODEL exactly as planned for this machine and stream a continuation of --prompt."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    # Ctrl-C propagates to the CLI's boundary, which says "interrupted" and exits 130.
    _run(err, model, prompt, quant, gpus, context, chat, system, raw, allow_offload, as_json, engine,
         dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed), adapter)


def _run(err: Console, model: str, prompt, quant: str, gpus, context: int | None, chat: bool, system, raw: bool,
         allow_offload: bool, as_json: bool, engine: str, sampling: dict, adapter: Path | None = None) -> None:
    from heavylift.api import prepare
    from heavylift.finetune.adapter import adapter_engine
    from heavylift.runtime.sampling import Sampling
    from heavylift.runtime.session import wraps_in_template

    _check_arguments(prompt, chat, raw)
    Sampling(**sampling)  # refuse bad values before loading anything
    if adapter is not None:
        engine, note = adapter_engine(engine, adapter)
    prepared = prepare(model, quant=quant, gpus=gpus, context=context, allow_offload=allow_offload, engine=engine,
                       adapter=adapter)  # the adapter checked against the model and counted in the plan
    if adapter is not None:
        err.print(escape(note))
    prompt_tokens = _check_prompt(prepared, prompt, system, chat, raw, sampling["max_new_tokens"])
    for warning in prepared.plan.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}")
    if prompt is not None and not chat and wraps_in_template(prepared.tokenizer, prompt, raw):
        err.print(f"[dim]{WRAPPED_NOTE}[/]")
    session = load_session(err, prepared, adapter)
    if as_json:
        _generate_json(session, prompt, system, raw, sampling, prompt_tokens)
        return
    engine_line = "fast engine" if session.engine is not None else \
        f"transformers ({session.engine_note if adapter is None else 'LoRA adapter'})"
    err.print(f"{model}: {session.quant}, {engine_line}, attention {session.attention}, "
              f"devices {', '.join(sorted(set(session.placement.modules.values())))}")
    if chat:
        _chat(session, prompt, system, sampling, err)
        return
    record = _stream_to_terminal(session, prompt, system, raw, sampling)
    err.print(_summary(session, record))
    for warning in session.memory_warnings():
        err.print(f"[yellow]plan vs measured:[/] {warning}")


def load_session(err: Console, prepared, adapter: Path | None):
    """Load the weights by the plan (the offload guard refuses what landed off it), with the LoRA adapter over
    them where one is given; warn of what --allow-offload left in CPU RAM. `run` and `serve` load through it."""
    from heavylift.finetune.adapter import apply_adapter

    session = prepared.load()
    if adapter is not None:
        apply_adapter(session.model, adapter)
    if session.offloaded_bytes:
        where = ", ".join(f"{n / 1e9:.2f} GB on {d}" for d, n in session.offloaded_bytes.items())
        err.print(f"[yellow]warning:[/] {where} offloaded; decode is predicted at "
                  f"{session.scheme.decode_tok_s_upper_bound:.2f} tok/s at best")
    return session


def _json(session, record) -> dict:
    return {"text": record.text, "prompt_tokens": record.prompt_tokens, "generated_tokens": record.generated_tokens,
            "finish_reason": record.finish_reason, "prefill_tok_s": record.prefill_tok_s,
            "decode_tok_s": record.decode_tok_s, "quant": session.quant, "attention": session.attention,
            "engine": "fast" if session.engine is not None else "transformers",
            "device_map": dict(session.placement.modules),
            "devices": {m.device: {"planned_bytes": m.planned_bytes, "allocated_bytes": m.allocated_bytes,
                                   "peak_bytes": m.peak_bytes} for m in session.remeasure()}}
