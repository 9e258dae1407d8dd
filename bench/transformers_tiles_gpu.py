"""Prefill speed and memory on transformers' forward by weight tile size, on one CUDA GPU.

transformers' forward dequantizes 4-bit weights and LLM.int8's outlier columns a tile of rows at a time
(runtime/bnb_forward.py) of at most TRANSFORMERS_TILE_BYTES: a smaller tile holds less beside the weights, but
each tile's GEMM is smaller. For each precision (--quants) on run_gpu's 8B-shaped random checkpoint, for each tile
size of --tiles-mib in turn (repeated --rounds times, so that clock drift falls on every size alike):
transformers_prefill_gpu.measure at a 2048-token chunk (a warm-up prefill, then --repeats timed prefills of an
8192-token prompt, their median tok/s, the allocated peak of a prefill above what was allocated before it).
The JSON (card, date, exact command, records) is rewritten after every measurement to --out.
Usage (GPU machine, after the kit prelude):
    python3 bench/transformers_tiles_gpu.py --out $OUT/transformers_tiles.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys

import torch

import heavylift.planner.matmul_programs as matmul_programs
from run_gpu import CKPT, make_checkpoint
from transformers_prefill_gpu import measure

MiB = 1 << 20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--quants", default="nf4-dq,int8")
    parser.add_argument("--tiles-mib", default="128,96", help="tile sizes, alternated in this order")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    measured = argparse.Namespace(prompt_tokens=8192, context=8200, repeats=args.repeats)
    result = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "command": "python3 " + shlex.join(sys.argv),
              "model": "Llama-3.1-8B shape, random bf16 weights (bench/run_gpu.py)", "runs": []}
    make_checkpoint(CKPT)
    kept = matmul_programs.TRANSFORMERS_TILE_BYTES
    try:
        for quant in args.quants.split(","):
            for _ in range(args.rounds):
                for mib in (int(m) for m in args.tiles_mib.split(",")):
                    matmul_programs.TRANSFORMERS_TILE_BYTES = mib * MiB  # read at each call
                    run = measure(quant, [2048], measured)
                    result["runs"].append({"quant": quant, "tile_mib": mib, **run})
                    with open(args.out, "w") as f:
                        json.dump(result, f, indent=1)
    finally:
        matmul_programs.TRANSFORMERS_TILE_BYTES = kept


if __name__ == "__main__":
    main()
