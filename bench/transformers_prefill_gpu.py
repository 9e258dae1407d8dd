"""Prefill speed and memory on transformers' forward at two prefill chunk sizes, on one CUDA GPU.

heavylift runs a prompt through transformers' forward in chunks (runtime/session.py PREFILL_CHUNK): a smaller
chunk holds less beyond weights and KV cache, but each chunk dequantizes every 4-bit weight tile once more and
quantizes LLM.int8's inputs in smaller pieces. For each precision (--quants) on run_gpu's 8B-shaped random
checkpoint, loaded with `heavylift.load(engine="transformers")` at --context: for each chunk size (--chunks), one
warm-up prefill, then --repeats timed prefills of a --prompt-token prompt through Session.steps (the CUDA
queue drained before and after), their median tok/s, and the allocated peak of a prefill above what was
allocated before it. The chunk sizes alternate per repeat so that clock drift falls on both alike.
The JSON (card, date, exact command, versions, records) is rewritten after every precision to --out.
Usage (GPU machine, after the kit prelude):
    python3 bench/transformers_prefill_gpu.py --out $OUT/transformers_prefill.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import statistics
import sys
import time

import torch

from run_gpu import CKPT, make_checkpoint


def prefill(session, ids: torch.Tensor) -> tuple[float, int]:
    """Seconds of one prefill of `ids` and its allocated peak above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t = time.perf_counter()
    with torch.inference_mode():
        logits, _, _ = session.steps(ids)
        logits.float().sum().item()  # waits for the last chunk
    seconds = time.perf_counter() - t
    del logits
    return seconds, torch.cuda.max_memory_allocated() - before


def measure(quant: str, chunks: list[int], args) -> dict:
    import heavylift
    import heavylift.runtime.session as session_module

    t = time.perf_counter()
    session = heavylift.load(CKPT, quant=quant, context=args.context, engine="transformers")
    load_s = time.perf_counter() - t
    vocab = session.model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    kept = session_module.PREFILL_CHUNK
    seconds: dict[int, list[float]] = {c: [] for c in chunks}
    peaks: dict[int, int] = {}
    try:
        for c in chunks:  # warm-up: kernels picked and compiled for this chunk's shapes
            session_module.PREFILL_CHUNK = c
            prefill(session, ids)
        for _ in range(args.repeats):
            for c in chunks:
                session_module.PREFILL_CHUNK = c
                s, peak = prefill(session, ids)
                seconds[c].append(s)
                peaks[c] = max(peaks.get(c, 0), peak)
    finally:
        session_module.PREFILL_CHUNK = kept
    del session
    gc.collect()
    torch.cuda.empty_cache()
    records = []
    for c in chunks:
        median = statistics.median(seconds[c])
        records.append({"quant": quant, "chunk": c, "prompt_tokens": args.prompt_tokens,
                        "tok_s": round(args.prompt_tokens / median, 1),
                        "seconds": [round(s, 4) for s in seconds[c]], "prefill_peak_above_bytes": peaks[c]})
        print(f"{quant} chunk {c}: {records[-1]['tok_s']} tok/s, peak above {peaks[c] / 1e9:.3f} GB", flush=True)
    base = records[0]["tok_s"]
    for r in records:
        r["tok_s_vs_first_chunk"] = round(r["tok_s"] / base, 4)
    return {"load_s": round(load_s, 2), "records": records}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--quants", default="nf4-dq,int8,nf4,bf16")
    parser.add_argument("--chunks", default="2048,1024", help="the first is the baseline of the ratios")
    parser.add_argument("--prompt-tokens", type=int, default=8192)
    parser.add_argument("--context", type=int, default=8200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import bitsandbytes
    import transformers

    result = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "command": "python3 " + shlex.join(sys.argv),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "bitsandbytes": bitsandbytes.__version__},
              "model": "Llama-3.1-8B shape, random bf16 weights (bench/run_gpu.py)", "precisions": {}}
    make_checkpoint(CKPT)
    chunks = [int(c) for c in args.chunks.split(",")]
    for quant in args.quants.split(","):
        result["precisions"][quant] = measure(quant, chunks, args)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
