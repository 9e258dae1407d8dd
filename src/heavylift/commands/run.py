"""`heavylift run MODEL --prompt TEXT`: load by the plan and stream tokens (or chat)."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console

from heavylift.defaults import DEFAULT_CONTEXT_TOKENS, DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P
from heavylift.errors import InvalidArgumentError
from heavylift.schemes import QUANT_CHOICES
from .plan import GPUS_HELP


def _summary(session, record) -> str:
    peaks = ", ".join(f"{m.device} {m.peak_bytes / 1e9:.2f} GB (plan {m.planned_bytes / 1e9:.2f})"
                      for m in session.remeasure())
    return (f"{record.prompt_tokens} prompt tokens, prefill {record.prefill_tok_s:.1f} tok/s, "
            f"{record.generated_tokens} generated at {record.decode_tok_s:.1f} tok/s, peak {peaks}")


def _stream_to_terminal(session, prompt, system, sampling, err: Console):
    last, ids = None, []
    try:
        for last in session.stream(prompt, system, **sampling):
            sys.stdout.write(last.text)
            sys.stdout.flush()
            ids.extend(last.token_ids)
    except KeyboardInterrupt:
        err.print("\n[interrupted]")
    sys.stdout.write("\n")
    return last, ids


def _chat(session, system, sampling, err: Console) -> None:
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    err.print("chat: /reset clears the history, /exit leaves")
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": line})
        last, ids = _stream_to_terminal(session, history, None, sampling, err)
        history.append({"role": "assistant", "content": session.tokenizer.decode(ids, skip_special_tokens=True)})


def run(
    model: str = typer.Argument(..., help="Local folder, catalog name backed by a downloaded copy, or hub id."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to continue (or the first chat turn)."),
    quant: str = typer.Option("auto", "--quant", help=f"auto (the plan's pick) or one of: {', '.join(QUANT_CHOICES)}."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help=GPUS_HELP),
    context: int = typer.Option(DEFAULT_CONTEXT_TOKENS, "--context", help="Tokens of prompt + output to plan for."),
    max_new_tokens: int = typer.Option(DEFAULT_MAX_NEW_TOKENS, "--max-new-tokens"),
    temperature: float = typer.Option(DEFAULT_TEMPERATURE, "--temperature", help="0 means greedy."),
    top_p: float = typer.Option(DEFAULT_TOP_P, "--top-p"),
    top_k: int = typer.Option(DEFAULT_TOP_K, "--top-k", help="0 keeps every token."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    chat: bool = typer.Option(False, "--chat", help="Interactive multi-turn chat with the tokenizer's template."),
    system: Optional[str] = typer.Option(None, "--system", help="System message for chat templates."),
    allow_offload: bool = typer.Option(False, "--allow-offload", help="Let layers that do not fit stay in CPU RAM."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
    engine: str = typer.Option("auto", "--engine",
                               help="auto (the fast engine where it runs, else transformers), fast, or transformers."),
) -> None:
    """Load MODEL exactly as planned and stream a continuation of --prompt."""
    import warnings

    from heavylift.runtime.sampling import Sampling
    from heavylift.runtime.session import load

    # bitsandbytes' LLM.int8 warns on every matmul that it casts bf16 inputs to fp16: expected, not news.
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")

    if prompt is None and not chat:
        raise InvalidArgumentError("give --prompt TEXT, or --chat for a conversation")
    if quant != "auto" and quant not in QUANT_CHOICES:
        raise InvalidArgumentError(f"--quant must be auto or one of {', '.join(QUANT_CHOICES)}, not {quant!r}")
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    Sampling(**sampling)  # refuse bad values before loading anything
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    session = load(model, quant=quant, gpus=gpus, context=context, allow_offload=allow_offload, engine=engine)
    if session.offloaded_bytes:
        where = ", ".join(f"{n / 1e9:.2f} GB on {d}" for d, n in session.offloaded_bytes.items())
        err.print(f"[yellow]warning:[/] {where} offloaded; decode is predicted at "
                  f"{session.scheme.decode_tok_s_upper_bound:.2f} tok/s at best")
    if as_json:
        record = session.generate(prompt, system, **sampling)
        typer.echo(json.dumps(_json(session, record), indent=2))
        return
    engine_line = "fast engine" if session.engine is not None else f"transformers ({session.engine_note})"
    err.print(f"{model}: {session.quant}, {engine_line}, attention {session.attention}, "
              f"devices {', '.join(sorted(set(session.placement.modules.values())))}")
    if chat:
        _chat(session, system, sampling, err)
        return
    last, _ = _stream_to_terminal(session, prompt, system, sampling, err)
    if last is not None:
        err.print(_summary(session, last))
    for warning in session.memory_warnings():
        err.print(f"[yellow]plan vs measured:[/] {warning}")


def _json(session, record) -> dict:
    return {"text": record.text, "prompt_tokens": record.prompt_tokens, "generated_tokens": record.generated_tokens,
            "finish_reason": record.finish_reason, "prefill_tok_s": record.prefill_tok_s,
            "decode_tok_s": record.decode_tok_s, "quant": session.quant, "attention": session.attention,
            "engine": "fast" if session.engine is not None else "transformers",
            "device_map": dict(session.placement.modules),
            "devices": {m.device: {"planned_bytes": m.planned_bytes, "allocated_bytes": m.allocated_bytes,
                                   "peak_bytes": m.peak_bytes} for m in session.remeasure()}}
