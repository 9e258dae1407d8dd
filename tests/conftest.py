"""Shared fixtures: tiny configs and checkpoints built on the spot, user paths in a temp dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

import tempfile

import pytest

from heavylift.planner.allocator import CachingAllocator

# huggingface_hub reads these when first imported: set them before any test imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="heavylift-test-hf-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No GPU here: the engine's Triton kernels run in Triton's CPU interpreter (set before triton is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_numpy2_shim() -> None:
    """Triton 3.6's interpreter turns 1-element arrays into Python ints with int(array), which NumPy 2.4
    refuses; index them instead. Test-only: the compiled kernels on a GPU never take this path."""
    try:
        import triton.runtime.interpreter as interp
    except ImportError:
        return
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched


_interpreter_numpy2_shim()

# A Llama small enough to count by hand (see test_planner.py for the bytes).
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
              "max_position_embeddings": 512, "tie_word_embeddings": False}

# Tiny members of every family heavylift supports, with each family's quirks switched on.
TINY_FAMILIES = {
    "llama": dict(TINY_LLAMA),
    "mistral": {**TINY_LLAMA, "model_type": "mistral", "sliding_window": 32},
    "mixtral": {**TINY_LLAMA, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": {**TINY_LLAMA, "model_type": "qwen2"},
    "gemma2": {**TINY_LLAMA, "model_type": "gemma2", "head_dim": 32, "tie_word_embeddings": True,
               "sliding_window": 16, "query_pre_attn_scalar": 32},
    "phi3": {**TINY_LLAMA, "model_type": "phi3", "pad_token_id": 0},
    "qwen3": {**TINY_LLAMA, "model_type": "qwen3", "head_dim": 16},
    # layer 0 dense (mlp_only_layers), layer 1 sparse
    "qwen3_moe": {**TINY_LLAMA, "model_type": "qwen3_moe", "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32, "mlp_only_layers": [0], "norm_topk_prob": True},
    # a sliding layer, then a full one
    "gemma3_text": {**TINY_LLAMA, "model_type": "gemma3_text", "head_dim": 32, "tie_word_embeddings": True,
                    "sliding_window": 16, "sliding_window_pattern": 2, "query_pre_attn_scalar": 32},
    # layer 0 dense with chunked attention and RoPE, layer 1 MoE with full attention and no RoPE. Widths are
    # multiples of 64 and the router's 32 outputs a multiple of 32, as bitsandbytes' CPU kernels need.
    "llama4_text": {**TINY_LLAMA, "model_type": "llama4_text", "head_dim": 16, "intermediate_size": 64,
                    "intermediate_size_mlp": 128, "num_local_experts": 32, "num_experts_per_tok": 1,
                    "interleave_moe_layer_step": 2, "attention_chunk_size": 16, "no_rope_layer_interval": 2},
    # layer 0 dense, layer 1 MoE with a shared expert; latent attention (ranks and RoPE channels of 64 and 32, so
    # that every projection suits bitsandbytes' CPU kernels, as DeepSeek-V3's own 1536, 512 and 64 do)
    "deepseek_v3": {**TINY_LLAMA, "model_type": "deepseek_v3", "num_key_value_heads": 4, "n_routed_experts": 4,
                    "num_experts_per_tok": 2, "moe_intermediate_size": 64, "n_shared_experts": 1,
                    "first_k_dense_replace": 1, "kv_lora_rank": 64, "q_lora_rank": 64, "qk_rope_head_dim": 32,
                    "qk_nope_head_dim": 32, "v_head_dim": 32, "n_group": 2, "topk_group": 1},
    # a sliding layer, then a full one; sinks, biases
    "gpt_oss": {**TINY_LLAMA, "model_type": "gpt_oss", "head_dim": 16, "intermediate_size": 64,
                "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 16},
}


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Keep every test's user files in a temp dir."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def save_tiny_checkpoint(folder: Path, family: str, **overrides) -> Path:
    """A random-weight checkpoint of one family, saved by transformers itself."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {**TINY_FAMILIES[family], **overrides}
    cfg = AutoConfig.for_model(**config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return folder


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TOKENIZER_VOCAB = 300  # byte-level BPE: 256 bytes + 8 specials + merges; models get 320 rows


def save_tiny_tokenizer(folder: Path) -> None:
    """A byte-level BPE with a chat template, trained here on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["hello world", "the quick brown fox jumps over the lazy dog", "how are you today"] * 10
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>", chat_template=CHAT_TEMPLATE).save_pretrained(folder)


def save_runnable_checkpoint(folder: Path, family: str) -> Path:
    """A tiny random-weight checkpoint of `family` with a tokenizer: what `heavylift run` loads."""
    save_tiny_checkpoint(folder, family, vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    save_tiny_tokenizer(folder)
    return folder


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter: runs Triton kernels in the CPU interpreter (slow); "
                                       "`make test-fast` leaves these out")


def compile_apart(code: str, cache: Path):
    """Run `code` (Python that compiles kernels for a GPU target and prints JSON last) in a process of its own,
    with bench/ importable, without Triton's interpreter (which this suite runs under, and whose patches of the
    language a kernel run before may leave in place) and with the empty Triton cache `cache`, so the kernels are
    compiled, never read from a cache; its last line, parsed."""
    import subprocess
    import sys

    bench = str(Path(__file__).resolve().parents[1] / "bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {bench!r})\n{code}"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`heavylift ARGS` in this process: (exit code, stdout, stderr)."""
    from heavylift.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


class CountingAllocator(CachingAllocator):
    """Counts the requests it serves."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def malloc(self, nbytes: int):
        self.requests += 1
        return super().malloc(nbytes)
