"""Every default and heuristic constant, each with its unit and where its value comes from.

The planner and the runtime read these; nothing else writes numbers like them.
"""

from __future__ import annotations

GiB = 1024**3
GB = 10**9
MiB = 1024**2

# --- What a user gets without flags -------------------------------------------------------
DEFAULT_CONTEXT_TOKENS = 8192  # tokens of prompt + generation the plan reserves KV cache for
DEFAULT_BATCH = 1  # sequences decoded together
DEFAULT_MAX_NEW_TOKENS = 256  # tokens `heavylift run` generates unless told
DEFAULT_TEMPERATURE = 0.7  # 0 means greedy
DEFAULT_TOP_P = 1.0  # nucleus mass; 1.0 keeps every token
DEFAULT_TOP_K = 0  # 0 keeps every token
DEFAULT_RESERVE_BYTES = 0  # per-device headroom the plan must leave free (--reserve)

# --- Bytes the runtime holds besides weights, KV cache and activations ---------------------
# What a torch process holds outside the caching allocator once it has run a prefill and decode: CUDA
# context, cuBLAS/cuBLASLt handles, loaded kernel modules. Measured on one H100 (torch 2.11 + CUDA 13,
# bench/results/plan_validation_h100_2026-11-26.json, non_allocator_bytes after decode): 730,660,864 in
# every bf16, FP8 and NF4 case on transformers. Other GPUs and drivers differ by tens of MiB.
CUDA_CONTEXT_BYTES = 730_660_864
# The same with bitsandbytes' LLM.int8 kernels loaded (its cuBLASLt int8 context): 799,866,880 in both
# int8 cases of that file, 66 MiB more.
LLM_INT8_CONTEXT_BYTES = 799_866_880
# The caching allocator rounds every block up to a multiple of 512 bytes (c10/cuda/
# CUDACachingAllocator.cpp, kMinBlockSize); weights are counted tensor by tensor with it.
ALLOCATION_GRANULE_BYTES = 512

# LLM.int8 (transformers' BitsAndBytesConfig threshold 6.0) multiplies in bf16 every input column that
# holds an entry of 6 or more, against those weight columns dequantized in fp32: data-dependent memory.
# Random-weight checkpoints have such entries in nearly every column of the MLP's down projection
# (bench/results/plan_validation_h100_2026-11-26.json, int8 cases: 365 MB above a count without them,
# matched to 0.1% with all of them); trained models in a handful. The plan counts the worst case, every
# column (for an 8B model about 0.3 GB more than a trained model's run takes).
LLM_INT8_OUTLIER_COLUMN_FRACTION = 1.0

# --- Prefill --------------------------------------------------------------------------------
# heavylift's loop prefills the prompt in chunks of this many tokens, which bounds the
# activation peak whatever the context (mlx-lm and vLLM do the same).
PREFILL_CHUNK_TOKENS = 2048
# MoE experts quantized to 8 bits while they load (experts._quantize_rows) go through float32 this many
# elements at a time (64 MB), not a whole fused tensor at once (Mixtral's gate_up_proj: 3.8 GB).
EXPERT_ROW_CHUNK_ELEMENTS = 1 << 24
# Dense weights quantized to FP8 while they load (float8_load.py) go through torchao this many elements at a
# time: its float32 copies of a chunk take 3 x 16 MB instead of 3 x 3.5 GB for a 405B MLP weight. Smaller
# pieces fragment less: by the planner's replay, the load reserve beyond the weights of Qwen2.5-7B is 1.30 GB
# whole, 1.38 GB at 1 << 24 and 0.21 GB at 1 << 22; of 16 layers of Llama-3.1-405B 15.7, 2.6 and 2.6 GB.
LOAD_ROW_CHUNK_ELEMENTS = 1 << 22
# torchao leaves a weight unquantized unless both its sides divide by 16 (_fp8_mm_compat): pieces of a weight
# quantized on load hold a multiple of this many rows.
FP8_ROW_MULTIPLE = 16

# Scaled-dot-product attention with a mask runs PyTorch's memory-efficient kernel, which reads the mask as it
# is when its length and its row strides are multiples of this many elements, and otherwise pads or copies it
# (attention.cpp preprocess_mask). The engine's prefill masks have rows this many elements apart.
SDPA_MASK_ALIGNMENT = 16

# --- The engine's decode attention ------------------------------------------------------------
# Split-K attention of a decode step: each (sequence, kv head) is cut into slices so that about this many
# attention programs run per multiprocessor, and never more than DECODE_SPLITS_MAX slices (the planner
# sizes the partial outputs for the most).
DECODE_SPLITS_TARGET = 2
DECODE_SPLITS_MAX = 64

# --- Offload (only with --allow-offload) --------------------------------------------------
# Weights offloaded to CPU RAM stream over PCIe every token: PCIe 4.0 x16 moves about 25 GB/s
# in practice (32 GB/s on paper).
PCIE_BANDWIDTH_BYTES_S = 25e9
# Bandwidth of CPU memory for a plan that runs on the CPU: dual-channel DDR4/DDR5 desktops read
# 40-80 GB/s; servers read more. A conservative figure for the upper bound on decode speed.
CPU_MEMORY_BANDWIDTH_BYTES_S = 50e9

# --- Verdicts -----------------------------------------------------------------------------
# Contexts the plot draws each precision's memory at, in tokens.
CONTEXT_STEPS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
# The contexts advice names ("use --context", "room for --context") are multiples of this many tokens, or the
# context asked for or the model's maximum: a round number to type, at most this many tokens short of the
# exact longest, and a search over 512 steps instead of 131,072 tokens.
ADVICE_CONTEXT_STEP_TOKENS = 256
