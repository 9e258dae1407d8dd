"""Plan against reality on a GPU: an 8B-shaped random checkpoint loaded by heavylift in each precision.

For each precision: plan, load (timed), stream a prompt of `--prompt-tokens` tokens and generate
`--new-tokens`, then record the plan's bytes next to torch's allocated and peak bytes per device.
Usage (GPU machine, after the kit prelude): python bench/run_gpu.py --out $OUT/run_<card>_<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
# The tests' conftest (imported for its tokenizer) turns on Triton's CPU interpreter unless told otherwise.
os.environ.setdefault("TRITON_INTERPRET", "0")

CKPT = "/tmp/llama8b-heavylift"
# Llama-3.1-8B's shape (its config.json), with the tiny tokenizer's special ids.
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def make_checkpoint(folder: str = CKPT, device: str = "cuda", **shape) -> None:
    """A random bf16 checkpoint of LLAMA_8B (`shape` overrides fields, e.g. num_hidden_layers), built on
    `device`, with a tiny tokenizer, in `folder`; kept when it is there already."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import save_tiny_tokenizer  # a small real tokenizer: ids stay inside the 128k vocab

    if os.path.exists(f"{folder}/config.json"):
        return
    cfg = LlamaConfig(**{**LLAMA_8B, **shape})
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    save_tiny_tokenizer(folder)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    import heavylift

    parser = argparse.ArgumentParser()
    parser.add_argument("--quants", default="nf4-dq,fp8,bf16")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    make_checkpoint()
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 60)
    records = []
    for quant in args.quants.split(","):
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        session = heavylift.load(CKPT, quant=quant, context=args.context)
        load_s = time.perf_counter() - t
        after_load = session.remeasure()
        record = session.generate(prompt, max_new_tokens=args.new_tokens, temperature=0)
        after_run = session.remeasure()
        free, total = torch.cuda.mem_get_info()
        records.append({
            "quant": quant, "context": args.context, "load_s": load_s, "attention": session.attention,
            "prompt_tokens": record.prompt_tokens, "generated_tokens": record.generated_tokens,
            "prefill_tok_s": record.prefill_tok_s, "decode_tok_s": record.decode_tok_s,
            "plan": {k: getattr(session.scheme, k) for k in ("weights_bytes", "kv_cache_bytes", "activation_bytes",
                                                             "overhead_bytes", "total_bytes")},
            "devices": [{"device": m.device, "planned_bytes": m.planned_bytes,
                         "allocated_after_load": a.allocated_bytes, "allocated_bytes": m.allocated_bytes,
                         "peak_bytes": m.peak_bytes, "process_bytes_nvml_like": total - free}
                        for a, m in zip(after_load, after_run)],
        })
        print(json.dumps(records[-1]), flush=True)
        del session
        gc.collect()
        torch.cuda.empty_cache()
    result = {"card": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
              "command": "python " + " ".join(sys.argv), "torch": torch.__version__, "records": records}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
