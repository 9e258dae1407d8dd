"""Serving under load on one GPU: `heavylift serve` and the reference stack behind the same load generator.

The model is bench/run_gpu.py's 8B-shaped random checkpoint, beside a word-level tokenizer that gives every
one of its 128,256 ids a word of its own, so each generated token is text and each prompt word one token.
For each precision:
- `heavylift serve` (a subprocess) under a load of `--concurrency` clients, each sending `--rounds`
  streamed completions of `--prompt-tokens` tokens and `--max-tokens` out, greedy;
- the reference stack: the same weights loaded by heavylift's plan, served by transformers' `generate`
  over whatever requests wait when it is free (static batches: the serving loop transformers' generate
  allows), behind a server of the same wire format (`--reference-server`, a subprocess), same load;
- the fast engine's batch-1 decode rate from `heavylift bench`'s own timing (runtime.benchmark), which the
  single stream is held to.
Per load: time to first token and inter-token latency (p50, p99), output tok/s, requests/s, failures.

Usage (GPU machine, after the kit prelude):
    python bench/serve_gpu.py --out $OUT/serve_<card>_<date>.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))

SERVE_CKPT = "/tmp/llama8b-serve"
WORDS = 128256  # the checkpoint's vocabulary: one word per id
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
MODEL_NAME = "bench-8b"


def make_checkpoint() -> str:
    """run_gpu.py's random 8B checkpoint, its files linked beside a word-level tokenizer of the full vocab."""
    import run_gpu

    run_gpu.make_checkpoint()
    if os.path.exists(f"{SERVE_CKPT}/tokenizer.json"):
        return SERVE_CKPT
    os.makedirs(SERVE_CKPT, exist_ok=True)
    for name in os.listdir(run_gpu.CKPT):
        if name.endswith((".safetensors", ".json")) and not name.startswith(("tokenizer", "special_tokens")):
            os.symlink(os.path.join(run_gpu.CKPT, name), os.path.join(SERVE_CKPT, name))
    save_word_tokenizer(SERVE_CKPT)
    return SERVE_CKPT


def save_word_tokenizer(folder: str) -> None:
    """A word-level tokenizer giving each of the WORDS ids a word of its own ("t<id>" past the specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS)} | {f"t{i}": i for i in range(len(SPECIALS), WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, limit_s: float = 900) -> float:
    t = time.perf_counter()
    while time.perf_counter() - t < limit_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t
        except Exception:
            pass
        time.sleep(1)
    raise RuntimeError("the server did not become healthy")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load(base: str, concurrency: int, rounds: int, prompt_tokens: int, max_tokens: int, seed: int) -> dict:
    """`concurrency` clients, each sending `rounds` streamed completions one after another."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="bench", max_retries=0, timeout=3600)
    done, failures = [], []

    async def one_client(c: int) -> None:
        for r in range(rounds):
            rng = random.Random(seed * 100003 + c * 101 + r)
            prompt = " ".join(f"t{rng.randrange(len(SPECIALS), WORDS)}" for _ in range(prompt_tokens))
            start, times, usage = time.perf_counter(), [], None
            try:
                stream = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens,
                                                         temperature=0, stream=True,
                                                         stream_options={"include_usage": True})
                async for chunk in stream:
                    now = time.perf_counter()
                    if chunk.choices and chunk.choices[0].text:
                        times.append(now)
                    if chunk.usage:
                        usage = chunk.usage
            except Exception as e:  # recorded, not raised: a failure is a result
                failures.append(f"{type(e).__name__}: {e}"[:300])
                continue
            done.append((start, times, usage.completion_tokens if usage else len(times)))

    t = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(concurrency)))
    wall = time.perf_counter() - t
    await client.close()
    ttft = [times[0] - start for start, times, _ in done if times]
    itl = [b - a for _, times, _ in done for a, b in zip(times, times[1:])]
    streams = [(n - 1) / (times[-1] - times[0]) for _, times, n in done if len(times) > 1]
    tokens = sum(n for *_, n in done)
    return dict(concurrency=concurrency, requests=len(done), failed=len(failures), failures=failures[:5],
                wall_s=round(wall, 3), output_tok_s=round(tokens / wall, 1), requests_s=round(len(done) / wall, 3),
                completion_tokens=tokens,
                ttft_p50_s=percentile(ttft, 0.5), ttft_p99_s=percentile(ttft, 0.99),
                itl_p50_s=percentile(itl, 0.5), itl_p99_s=percentile(itl, 0.99),
                stream_tok_s_p50=percentile(streams, 0.5))


def serve_and_load(command: list[str], loads: list[tuple[int, int]], args, log_path: str) -> tuple[float, list]:
    """Start a server, run each (concurrency, rounds) load after a warm-up request, stop it."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command + ["--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        ready_s = wait_healthy(base, proc)
        asyncio.run(load(base, 1, 1, args.prompt_tokens, 8, seed=99))  # warm-up: first prefill, first steps
        results = []
        for concurrency, rounds in loads:
            result = asyncio.run(load(base, concurrency, rounds, args.prompt_tokens, args.max_tokens, seed=concurrency))
            print(json.dumps(result), flush=True)
            results.append(result)
        return ready_s, results
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def engine_b1_tok_s(quant: str) -> float:
    """heavylift bench's batch-1 decode timing, on the engine over the same shapes (random weights)."""
    import torch
    from transformers import AutoConfig

    from heavylift.engine.model import Engine
    from heavylift.engine.weights import KIND_NAMES
    from heavylift.runtime.benchmark import B1_NEW, B1_PROMPT, engine_decode_tok_s

    config = AutoConfig.from_pretrained(SERVE_CKPT)
    kind = next(k for k, name in KIND_NAMES.items() if name == quant)
    engine = Engine.from_random(config, kind, "cuda", batch=1, context=1024)
    rate = engine_decode_tok_s(engine, 1, B1_PROMPT, B1_NEW)
    del engine
    torch.cuda.empty_cache()
    return rate


# --- the reference server: transformers' generate over static batches --------------------------------

def reference_server(quant: str, port: int, context: int, max_batch: int) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from transformers.generation.streamers import BaseStreamer

    from heavylift.api import prepare
    from heavylift.runtime.loader import expected_int8_casts

    app = FastAPI()
    state = {"model": None}
    tokenizer = None
    waiting: list = []
    wake = threading.Event()

    class Fanout(BaseStreamer):
        """Each step's new tokens [batch] to each request's queue; the prompt (the first put) skipped."""

        def __init__(self, requests, loop):
            self.requests, self.loop, self.prompt_seen = requests, loop, False

        def put(self, value):
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for req, token in zip(self.requests, value.view(-1).tolist()):
                if req["sent"] < req["max_tokens"]:
                    req["sent"] += 1
                    self.loop.call_soon_threadsafe(req["queue"].put_nowait, token)

        def end(self):
            for req in self.requests:
                self.loop.call_soon_threadsafe(req["queue"].put_nowait, None)

    def worker():
        model = state["model"]
        while True:
            wake.wait()
            time.sleep(0.05)  # requests sent together are batched together
            wake.clear()
            while waiting:
                batch = [waiting.pop(0) for _ in range(min(max_batch, len(waiting)))]
                width = max(len(r["ids"]) for r in batch)
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, r in enumerate(batch):  # left padding, as decoder-only generate wants
                    ids[i, width - len(r["ids"]):] = torch.tensor(r["ids"])
                    mask[i, width - len(r["ids"]):] = 1
                with torch.inference_mode(), expected_int8_casts():
                    model.generate(ids.cuda(), attention_mask=mask.cuda(), do_sample=False,
                                   max_new_tokens=max(r["max_tokens"] for r in batch), pad_token_id=0,
                                   streamer=Fanout(batch, batch[0]["loop"]))

    @app.get("/health")
    async def health():
        return JSONResponse({"ok": state["model"] is not None}, status_code=200 if state["model"] else 503)

    async def completions(request: Request):
        body = await request.json()
        req = dict(ids=tokenizer(body["prompt"])["input_ids"], max_tokens=body["max_tokens"], sent=0,
                   queue=asyncio.Queue(), loop=asyncio.get_running_loop())
        waiting.append(req)
        wake.set()

        async def events():
            n = 0
            while (token := await req["queue"].get()) is not None:
                n += 1
                chunk = dict(id="ref", object="text_completion", created=0, model=MODEL_NAME,
                             choices=[dict(index=0, text=tokenizer.decode([token]) + " ", finish_reason=None,
                                           logprobs=None)])
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = dict(prompt_tokens=len(req["ids"]), completion_tokens=n, total_tokens=len(req["ids"]) + n)
            yield f"data: {json.dumps(dict(id='ref', object='text_completion', created=0, model=MODEL_NAME, choices=[], usage=usage))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # Registered as a plain Starlette route: FastAPI would read the (string) annotation as a query field.
    app.add_route("/v1/completions", completions, methods=["POST"])

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SERVE_CKPT)
    state["model"] = prepare(SERVE_CKPT, quant, context=context, batch=max_batch,
                             engine="transformers").load_weights().model
    threading.Thread(target=worker, daemon=True).start()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quants", default="nf4-dq,fp8,bf16")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--reference-concurrency", default="1,16")
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--max-seqs", type=int, default=64)
    parser.add_argument("--out")
    parser.add_argument("--reference-server", metavar="QUANT", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_server:
        return reference_server(args.reference_server, args.port, args.context, args.max_seqs)
    import torch

    make_checkpoint()
    logs = os.path.join(os.path.dirname(args.out), "serve_logs")
    os.makedirs(logs, exist_ok=True)
    heavylift = shutil.which("heavylift") or None
    base_cmd = [heavylift] if heavylift else [sys.executable, "-m", "heavylift"]
    records = []
    for quant in args.quants.split(","):
        served = serve_and_load(base_cmd + ["serve", SERVE_CKPT, "--quant", quant, "--context", str(args.context),
                                            "--max-seqs", str(args.max_seqs), "--served-model-name", MODEL_NAME],
                                [(int(c), args.rounds) for c in args.concurrency.split(",")], args,
                                os.path.join(logs, f"heavylift_{quant}.log"))
        reference = (0.0, [])  # --reference-concurrency "": heavylift alone
        if args.reference_concurrency:
            reference = serve_and_load([sys.executable, __file__, "--reference-server", quant, "--context",
                                        str(args.context), "--max-seqs", str(args.max_seqs)],
                                       [(int(c), 1) for c in args.reference_concurrency.split(",")], args,
                                       os.path.join(logs, f"reference_{quant}.log"))
        b1 = engine_b1_tok_s(quant)
        records.append(dict(quant=quant, heavylift=dict(ready_s=round(served[0], 1), loads=served[1]),
                            reference=dict(ready_s=round(reference[0], 1), loads=reference[1]),
                            bench_b1_decode_tok_s=round(b1, 1)))
        print(json.dumps(records[-1]), flush=True)
        out = dict(card=torch.cuda.get_device_name(0), date=datetime.date.today().isoformat(),
                   command="python bench/serve_gpu.py " + " ".join(sys.argv[1:]),
                   model="8B-shaped random checkpoint (bench/run_gpu.py) with a word-level tokenizer",
                   prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, context=args.context,
                   max_seqs=args.max_seqs, records=records)
        with open(args.out, "w") as f:  # after each precision: a run cut short keeps what it measured
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
