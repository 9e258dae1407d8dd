"""Every default and heuristic constant, each with its unit and where its value comes from.

The planner and the runtime read these; nothing else writes numbers like them.
"""

from __future__ import annotations

GiB = 1024**3
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
# CUDA context + cuBLAS workspace + loaded kernels of a torch 2.x process with CUDA's lazy
# module loading, as NVML sees it on Hopper after the first matmul: about 500-600 MiB. This is
# the middle of that range; the plan-validation benchmark (bench/validate_plan.py) measures it.
CUDA_CONTEXT_BYTES = 560 * MiB
# The caching allocator rounds every block up to a multiple of 512 bytes (c10/cuda/
# CUDACachingAllocator.cpp, kMinBlockSize); weights are counted tensor by tensor with it.
ALLOCATION_GRANULE_BYTES = 512
# Fragmentation of the caching allocator during prefill: freed activation blocks that cannot
# be reused for differently sized ones. 5% of the activation peak, a heuristic to be checked by
# the plan-validation benchmark.
ALLOCATOR_SLACK_FRACTION = 0.05

# --- Activation peak of one decoder layer during prefill ----------------------------------
# heavylift's loop prefills the prompt in chunks of this many tokens, which bounds the
# activation peak whatever the context (mlx-lm and vLLM do the same).
PREFILL_CHUNK_TOKENS = 2048
# Live [tokens, hidden] tensors at the layer's peak: residual stream, normed input, attention
# output and the MLP output being formed (LlamaDecoderLayer.forward in transformers 5).
ACTIVATION_HIDDEN_COPIES = 4
# Live [tokens, intermediate] tensors at the MLP peak: act(gate), up and their product
# (LlamaMLP.forward: down(act(gate(x)) * up(x))). With 4 hidden copies this reproduces the
# seed article's measured 4k-token prefill peak of an 8B model within 1% (489 MB extra).
ACTIVATION_INTERMEDIATE_COPIES = 3
# Last-position logits: the model's dtype (2 bytes) and the float32 copy sampling works on.
LOGITS_BYTES_PER_ENTRY = 2 + 4

# --- Offload (only with --allow-offload) --------------------------------------------------
# Weights offloaded to CPU RAM stream over PCIe every token: PCIe 4.0 x16 moves about 25 GB/s
# in practice (32 GB/s on paper).
PCIE_BANDWIDTH_BYTES_S = 25e9
# Bandwidth of CPU memory for a plan that runs on the CPU: dual-channel DDR4/DDR5 desktops read
# 40-80 GB/s; servers read more. A conservative figure for the upper bound on decode speed.
CPU_MEMORY_BANDWIDTH_BYTES_S = 50e9

# --- Verdicts -----------------------------------------------------------------------------
# Contexts the advice and the plot try when searching for the longest that fits, in tokens.
CONTEXT_STEPS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
