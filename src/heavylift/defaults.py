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

# --- What `heavylift plan MODEL --train` plans without flags (QLoRA, Dettmers et al. 2023) -------
DEFAULT_TRAIN_QUANT = "nf4-dq"  # the frozen base: 4-bit NormalFloat with double quantization
DEFAULT_LORA_R = 16  # adapter rank
DEFAULT_LORA_ALPHA = 32  # adapter scaling numerator (scaling = alpha / r); no memory of its own
DEFAULT_LORA_DROPOUT = 0.05  # the QLoRA paper's dropout for models up to 13B; 0 keeps no dropout masks
DEFAULT_TRAIN_SEQ_LEN = 2048  # tokens per training sequence
DEFAULT_MICRO_BATCH = 1  # sequences per forward and backward; more per optimizer step come by accumulation
MAX_LORA_R = 4096  # adapter rank; LoRA uses 4-256, and a rank past a projection's width adds nothing

# --- Bounds on what a user or a config.json may ask for -------------------------------------
# Each sits many times above every released model, so only a typo or a corrupt file meets it; past it,
# heavylift refuses in one line instead of building an inventory or a plan that exhausts memory or time.
MAX_LAYERS = 4096  # decoder layers; the deepest released LLMs have under 200 (Llama 3.1 405B: 126)
# Model width (hidden_size), and the attention width num_attention_heads x head_dim: the widest released
# LLMs are 16,384-18,432 wide (Llama 3.1 405B, Nemotron-4 340B).
MAX_HIDDEN_SIZE = 2**20
MAX_INTERMEDIATE_SIZE = 2**22  # MLP width; the widest released is 73,728 (Nemotron-4 340B)
MAX_ATTENTION_HEADS = 4096  # query or key/value heads per layer; Llama 3.1 405B has 128
MAX_HEAD_DIM = 4096  # channels per head; released models use 64-256 (Gemma 2: 256)
MAX_VOCAB_SIZE = 2**24  # tokens; the largest released vocabularies hold about 256,000 (Gemma 2)
MAX_EXPERTS = 4096  # MoE experts per layer; released models have at most 512 (Qwen3-Next)
# Tensors in a model's inventory (layers x experts is what makes them many): the largest released MoE
# checkpoints hold under 100,000 (Kimi K2: 60 MoE layers x 384 experts x 3 projections).
MAX_TENSORS = 2**18
# Parameters of a model: the largest released hold about 10^12 (Kimi K2: 1.04 x 10^12). The bounds above
# each allow far more in product; this one keeps a plan's work, which grows with the weights, to seconds.
MAX_PARAMETERS = 10**14
# Tokens per sequence (--context, and a config's max_position_embeddings): the longest released window is
# Llama 4 Scout's 10,485,760 tokens.
MAX_CONTEXT_TOKENS = 2**24
MAX_BATCH = 2**16  # sequences decoded together; serving stacks batch a few hundred (vLLM's default: 256)
# The most sequences a server decodes together (`heavylift serve`), and so the most a plan with --serve counts
# (SchemePlan.max_concurrent_sequences). The engine captures a CUDA graph per batch size up to it; past a few
# hundred, a decode step is bound by compute, not by reading the weights, and more sequences add latency
# rather than throughput (vLLM's default max_num_seqs: 256).
SERVE_MAX_SEQS = 256

# --- Bytes the runtime holds besides weights, KV cache and activations ---------------------
# What a torch process holds outside the caching allocator once it has run a prefill and decode: CUDA
# context, cuBLAS/cuBLASLt handles, loaded kernel modules. Measured on one H100 (torch 2.11 + CUDA 13,
# bench/results/plan_validation_h100_2026-11-26.json, non_allocator_bytes after decode): 730,660,864 in
# every bf16, FP8 and NF4 case on transformers. Other GPUs and drivers differ by tens of MiB.
CUDA_CONTEXT_BYTES = 730_660_864
# The same with bitsandbytes' LLM.int8 kernels loaded (its cuBLASLt int8 context): 799,866,880 in both
# int8 cases of that file, 66 MiB more.
LLM_INT8_CONTEXT_BYTES = 799_866_880
# The same for a QLoRA training step (heavylift finetune's recipe, docs/training.md), measured on one H100 (torch
# 2.11 + CUDA 13, bench/results/train_memory_h100_2026-12-06.json): 804,061,184 bytes outside the allocator
# after a step with torch's AdamW, in every case; the backward's kernels and autograd's own thread add to
# inference's.
TRAIN_CONTEXT_BYTES = 804_061_184
# bitsandbytes' paged optimizers keep the states of parameters of 10^5 elements or more in CUDA managed memory:
# with 3.6 MB and 5.5 MB of such states the device held 134,217,728 bytes more outside the allocator than with
# AdamW (same file). The plan counts the states, and at least this much.
PAGED_OPTIMIZER_MIN_MANAGED_BYTES = 128 * MiB
# What the caching allocator needs beyond a training step's allocated peak, with expandable segments (the
# recipe's PYTORCH_CUDA_ALLOC_CONF): the smallest allocator cap (torch.cuda.set_per_process_memory_fraction)
# under which the step still ran was at most 215 MB above the allocated peak in 7 cases from 1 to 19 GB (same
# file).
TRAIN_ALLOCATOR_SLACK_BYTES = 256 * MiB
# The same without expandable segments: up to 2,033,107,532 bytes above the allocated peak (same file; the
# logits' gigabyte-sized blocks fragment the cache). What heavylift finetune warns a step may need beyond its
# plan when PYTORCH_CUDA_ALLOC_CONF lacks expandable segments.
TRAIN_FRAGMENTED_SLACK_BYTES = 2_033_107_532
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
# LLM.int8 on transformers' forward (runtime/bnb_forward.py) quantizes its input a block of rows at a time:
# as many rows as keep the block's fp16 copy within this many bytes. bitsandbytes' int8_vectorwise_quant on a
# whole 2048-token chunk holds an fp16 copy, |x| in fp16 and the outlier map at once: 0.55 GB on Llama 3.1
# 405B's 53248-wide down projection, the peak of its forward; a block's is 40 MB. Its scales and int8 rows are
# per row, so the rows come out the same; the outlier columns are those of any block.
LLM_INT8_QUANT_BYTES = 16 * MiB

# --- Prefill --------------------------------------------------------------------------------
# heavylift's loop prefills the prompt in chunks of this many tokens, which bounds the
# activation peak whatever the context (mlx-lm and vLLM do the same).
PREFILL_CHUNK_TOKENS = 2048
# Where a device's memory is too tight for its layers' work on a whole chunk, its plan (plan.Layout.device_plan)
# has the engine run that device's layers over fewer of the chunk's tokens at a time: half, a quarter, ... down
# to this many. Each pass dequantizes the device's stored weights again (the plan states what that costs); a
# pass of 256 tokens still runs matmuls of 256 rows on the tensor cores.
PREFILL_MIN_ROWS = 256
# A prompt's own token log-probabilities (a server's `echo` with `logprobs`) come from the head over this
# many positions at a time: 64 x a 128k vocabulary in float32 is 33 MB, a whole chunk's would be 1 GB.
SCORE_ROWS = 64
# `heavylift serve --prefill-chunk N`: the most tokens of a prompt one standalone prefill chunk takes while
# other streams decode, that chunk running between two decode steps and holding every stream up for its
# length. On the engine only a prompt that asks for its own scores (echo with logprobs) still prefills that
# way while streams decode; the others ride inside the decode steps (SERVE_MIXED_STEP_TOKENS). A prompt alone
# goes in PREFILL_CHUNK_TOKENS, the default; N is at least this many.
SERVE_MIN_PREFILL_CHUNK_TOKENS = 16
# `heavylift serve` on the engine, while streams decode: each step carries every decoding stream's token and
# up to (this - the decoding streams) tokens of the oldest prompt still prefilling, as rows of one batch
# (chunked prefill in mixed steps, vLLM's name), so a prompt costs each stream a slightly longer step instead
# of a stall. Per weight precision, by what a step of N tokens costs on the 8B shape on an H100 (docs/
# engine.md "Every batch size": tokens/s at batch 16 and 64):
# - 4-bit, LLM.int8 and FP8: 64. engine/batched.py's mixed-input GEMM takes steps of up to 64 tokens (NF4-DQ: a
#   64-token step 7.9 ms, a 16-token one 5.0 ms; FP8 6.5 against 4.4 ms); above 64 a step falls back to
#   dequantize + cuBLAS (FP8: torch._scaled_mm).
# - bf16: 64. Above 16 tokens a step goes to cuBLAS, whose 64-token step costs 1.2x a 16-token one (7.9 against
#   6.6 ms): more prompt per step for little.
SERVE_MIXED_STEP_TOKENS = {"nf4": 64, "nf4-dq": 64, "int8": 64, "bf16": 64, "fp8": 64}
# A prompt's least share of a mixed step, where decoding rows alone reach SERVE_MIXED_STEP_TOKENS: without it
# a prompt beside 64 streams would advance one token a step (a 512-token prompt: 512 steps to its first token).
SERVE_MIXED_MIN_PREFILL_TOKENS = 16
# MoE experts quantized to 8 bits while they load (experts._quantize_rows) go through float32 this many
# elements at a time (64 MB), not a whole fused tensor at once (Mixtral's gate_up_proj: 3.8 GB).
EXPERT_ROW_CHUNK_ELEMENTS = 1 << 24
# Dense weights quantized to FP8 while they load (float8_load.py) go through torchao this many elements at a
# time: its float32 copies of a chunk take 3 x 16 MB instead of 3 x 3.5 GB for a 405B MLP weight. Smaller
# pieces fragment less: by the planner's replay, the load reserve beyond the weights of Qwen2.5-7B is 1.30 GB
# whole, 1.38 GB at 1 << 24 and 0.21 GB at 1 << 22; of 16 layers of Llama-3.1-405B 15.7, 2.6 and 2.6 GB.
LOAD_ROW_CHUNK_ELEMENTS = 1 << 22
# The engine's prefill matmuls (ops.dense_linear) dequantize a 4-bit, LLM.int8 or FP8 weight (FP8 where the GPU
# has no FP8 tensor cores) into one reused bf16 buffer of at most this many bytes, a tile of whole output rows at
# a time, and multiply the chunk by each tile into its output columns, instead of a bf16 copy of the whole weight
# (Llama-3.1-405B's MLP weights, 53248 x 16384: 1.75 GB each, and LLM.int8's fp32 copies of it: 2 x 3.5 GB).
# 128 MiB is 4096 rows of a 16384-wide weight: each tile's GEMM against a 2048-token chunk is still 0.27 TFLOP,
# large enough to fill an H100's tensor cores, and the largest 405B weight takes 13 of them.
DEQUANT_TILE_BYTES = 128 * MiB
# transformers' forward (runtime/bnb_forward.py) dequantizes its 4-bit weights beyond bitsandbytes' fused kernel
# into tiles of at most this many bytes of bf16, and multiplies LLM.int8 weights a tile of rows whose outlier
# columns, every column counted, dequantize to at most this many bytes of fp32 (matmul_programs.int8_tile_rows:
# 464 rows of 53248). Its layer holds more beside a tile than the engine's (the gate's output, the layer's input
# and its normed copy), so a 128 MiB tile would set the peak of a 405B device at 8k: by the planner 1.57 GB
# beyond weights and KV cache in NF4-DQ on 8 H100s, and 1.47 GB at any size from 32 to 112 MiB. On an H100 the
# 8B shape's 8k prefill at 96 MiB is 3.7% slower in NF4-DQ and 2.0% faster in LLM.int8 (docs/planner.md).
TRANSFORMERS_TILE_BYTES = 96 * MiB
# The engine's prefill runs a chunk's MLP over a block of its rows at a time (engine/model.py _prefill_mlp): as
# many rows as keep its one intermediate activation [rows, intermediate] (SiLU of the gate, the up projection
# multiplied into it a weight tile at a time) within this many bytes of bf16, in pieces of equal size. Each
# further piece dequantizes the MLP's three weights once more, so the bound sits above every catalog model's
# 2048-token chunk (Llama 3.1 405B's 53248-wide MLP: 0.22 GB, one piece) and cuts only wider ones.
PREFILL_MLP_BYTES = 256 * MiB
# torchao leaves a weight unquantized unless both its sides divide by 16 (_fp8_mm_compat): pieces of a weight
# quantized on load hold a multiple of this many rows.
FP8_ROW_MULTIPLE = 16
# Block-FP8 weights kept as stored run through heavylift's torch matmuls where transformers' finegrained-fp8
# kernel does not load (runtime/block_fp8_matmul.py): each dequantizes a tile of output rows at a time, the
# most whole row blocks whose float32 staging (padded to whole column blocks) holds at most this many weights:
# 64 MiB of float32 and 32 MiB of bf16 (DeepSeek-V3's 7168-wide inputs: 2304 rows a tile, not a whole
# 18432-row MLP weight, 264 MB in bf16). Larger tiles gain little: the matmul of 2304 rows already fills a GPU.
BLOCK_FP8_TILE_WEIGHTS = 1 << 24

# --- The prompt lengths a plan replays (planner/prompt_lengths.py) ---------------------------------
# What the caching allocator reserves is not monotone in the prompt length: at a shorter prompt a block that
# a tensor frees can be just too small for a later request that the longest prompt's block holds, and that
# request takes a segment of its own (docs/planner.md "Prompt lengths"). The planner replays the longest
# prompt of each shape the runtime's program takes; on transformers' forward, whose replay is cheap, also
# every length this close to the longest (where attention scores over the prompt and over the whole cache
# come within a segment's 2 MiB rounding of each other: gpt-oss-20b at 1k x 8 holds 3.2 GB more at 1,020
# tokens than at 1,024) ...
PROMPT_BAND_TOKENS = 16
# ... every length whose last chunk holds a multiple of this many rows (batch x tokens), where activations of a
# power-of-two width fill whole 2 MiB segments and leave no slack for a slightly larger request ...
PROMPT_ROW_GRID = 128
# ... and every length this close to the PROMPT_REFINE_COUNT worst found. Against a replay of every length of
# 180 transformers cases (bench/prompt_sweep.py), the worst these find is the most by 0.8% or less.
PROMPT_REFINE_TOKENS = 8
PROMPT_REFINE_COUNT = 2

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

# --- heavylift eval ---------------------------------------------------------------------------
# Tokens per evaluation window; the second half of each is scored (llama.cpp's perplexity uses its context,
# 512 by default, the same way; 2048 sees longer contexts, as today's models are used).
EVAL_WINDOW_TOKENS = 2048
# Precisions `heavylift eval` compares with the reference unless told.
EVAL_QUANTS = ("nf4-dq", "nf4", "fp4", "int8", "fp8", "bf16")
# The reference keeps, per scored position, the log-probabilities of its this many most likely tokens (all
# of them for a smaller vocabulary): float32 + int32 ids, 4 KiB a position. Past the top 512 tokens a trained
# model's remaining probability is a fraction of a percent; it enters the KL divergence as one lumped
# token (evaluation/metrics.py).
REFERENCE_TOP_K = 512
# Where heavylift keeps what it computes once and reuses (saved references): $HEAVYLIFT_CACHE, else
# $XDG_CACHE_HOME/heavylift, else ~/.cache/heavylift.
CACHE_ENV = "HEAVYLIFT_CACHE"
CACHE_FOLDER = "heavylift"

# --- heavylift finetune -----------------------------------------------------------------------
# QLoRA's recipe (Dettmers et al. 2023) beyond what the training plan takes (DEFAULT_LORA_R and the others,
# above): paged 8-bit AdamW at 2e-4, the rate rising over the first 3% of the steps, gradients clipped to 0.3.
FINETUNE_GRAD_ACCUM = 1  # micro-batches per optimizer step (--grad-accum)
FINETUNE_LEARNING_RATE = 2e-4  # peak learning rate (--lr)
FINETUNE_EPOCHS = 1.0  # passes over the training samples when --steps is not given
# The learning rate rises linearly over this fraction of the steps (at least one step), then follows a cosine
# to zero (transformers' get_cosine_schedule_with_warmup, without its first step at rate 0).
WARMUP_FRACTION = 0.03
MAX_GRAD_NORM = 0.3  # gradients are clipped to this global L2 norm (QLoRA's max_grad_norm)
LORA_WEIGHT_DECAY = 0.0  # AdamW's decoupled weight decay on the LoRA weights (QLoRA's weight_decay)
EVAL_FRACTION = 0.05  # of the training samples held out and scored, when no --eval-data is given
FINETUNE_EVAL_EVERY_STEPS = 100  # held-out loss every N optimizer steps (and before the first, and at the end)
FINETUNE_SAVE_EVERY_STEPS = 100  # a checkpoint every N optimizer steps (and at the end, and on Ctrl-C)
FINETUNE_LOG_EVERY_STEPS = 10  # a progress line every N steps where stderr is not a terminal
CHECKPOINTS_KEPT = 2  # the newest checkpoints kept in --out; older ones are deleted once a newer one is whole

# --- heavylift serve --------------------------------------------------------------------------
SERVE_HOST = "127.0.0.1"  # loopback: other machines reach the server only when --host says so
SERVE_PORT = 8000  # the port OpenAI-compatible servers listen on by default (vLLM, transformers serve)
# Requests that may wait for a free sequence slot; one more is refused with HTTP 429 at once, which tells a
# client to retry later instead of queueing behind minutes of work.
SERVE_MAX_QUEUE = 256
# A request body larger than this is refused (HTTP 413) before it is parsed. A 1M-token prompt is about 4 MB
# as text and about 7 MB as a JSON list of token ids, so every context a plan can hold fits well below it.
SERVE_MAX_BODY_BYTES = 16 * MiB
# Ctrl-C: in-flight requests get this many seconds to finish before they are cancelled and the server exits.
SERVE_DRAIN_SECONDS = 5.0
# What a request gets for a field it leaves out: the OpenAI API's documented defaults.
SERVE_COMPLETIONS_MAX_TOKENS = 16  # /v1/completions; chat completions default to the rest of the context
SERVE_TEMPERATURE = 1.0
SERVE_TOP_P = 1.0
# The OpenAI API's limits: at most this many alternatives per token (top_logprobs, completions' logprobs)
# and this many stop sequences; sampling temperature at most SERVE_MAX_TEMPERATURE.
SERVE_MAX_LOGPROBS = 5
SERVE_MAX_STOP = 4
SERVE_MAX_TEMPERATURE = 2.0
# Histogram buckets of /metrics, in seconds: time to the first token spans a queued long prefill; the time
# between tokens spans one decode step of a small model on a GPU (ms) to a large one offloaded (s).
SERVE_TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SERVE_ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
