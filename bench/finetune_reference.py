"""The reference beside bench/finetune_gpu.py: the same QLoRA step trained with plain peft + transformers' Trainer.

    python3 bench/finetune_reference.py MODEL DATA.txt --seq-len S --micro-batch B --steps N [--device cpu]

The QLoRA recipe as peft's and transformers' documentation write it, with the settings `heavylift finetune`
uses (heavylift.defaults): from_pretrained with bitsandbytes nf4, double quantization, bf16 compute; peft's
prepare_model_for_kbit_training with reentrant gradient checkpointing; LoRA r 16, alpha 32, dropout 0.05 on
every projection; Trainer with bf16 autocast, bitsandbytes' paged 8-bit AdamW (optim="paged_adamw_8bit"), the
same learning rate, clipping and weight decay, a cosine schedule, one micro-batch per optimizer step. The data
are the same text packed the same way (BOS, the words, EOS, cut into S-token pieces that learn every token).
PYTORCH_CUDA_ALLOC_CONF is whatever the caller's environment says (unset: PyTorch's default allocator).

Prints one line, RESULT_MARKER and a JSON object: the seconds from the training's start to the end of each
optimizer step (the device synchronised there), the tokens of each step, the allocator's peaks, the load time
and the libraries' versions.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from heavylift.defaults import (DEFAULT_LORA_ALPHA, DEFAULT_LORA_DROPOUT, DEFAULT_LORA_R, FINETUNE_LEARNING_RATE,
                                LORA_WEIGHT_DECAY, MAX_GRAD_NORM)

RESULT_MARKER = "FINETUNE_REFERENCE "
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def packed(tokenizer, text: str, seq_len: int) -> list[dict]:
    """The text as full `seq_len`-token sequences (a shorter tail is dropped), labels equal to the tokens."""
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return [{"input_ids": ids[i:i + seq_len], "labels": ids[i:i + seq_len]}
            for i in range(0, len(ids) - seq_len + 1, seq_len)]


def load(model: str, device: str):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(model, quantization_config=quant, dtype=torch.bfloat16,
                                                device_map={"": 0 if device == "cuda" else "cpu"})
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True,
                                           gradient_checkpointing_kwargs={"use_reentrant": True})
    lora = LoraConfig(r=DEFAULT_LORA_R, lora_alpha=DEFAULT_LORA_ALPHA, lora_dropout=DEFAULT_LORA_DROPOUT,
                      target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


def step_clock(sync):
    """A TrainerCallback noting, at each optimizer step's end (after `sync()`), the seconds since training began."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.started, self.ends = 0.0, []

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.ends.append(time.perf_counter() - self.started)

    return Clock()


def train(args) -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    cuda = args.device == "cuda"
    started = time.perf_counter()
    model = load(args.model, args.device)
    load_s = time.perf_counter() - started
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = packed(tokenizer, Path(args.data).read_text(), args.seq_len)
    clock = step_clock(torch.cuda.synchronize if cuda else (lambda: None))
    with tempfile.TemporaryDirectory(prefix="finetune-reference-") as out:
        options = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=1,
            max_steps=args.steps, learning_rate=FINETUNE_LEARNING_RATE, lr_scheduler_type="cosine",
            weight_decay=LORA_WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM, optim="paged_adamw_8bit", bf16=True,
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True},
            logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
            use_cpu=not cuda, dataloader_num_workers=0)
        Trainer(model=model, args=options, train_dataset=data, callbacks=[clock]).train()
    result = {"load_s": round(load_s, 2), "step_ends_s": [round(t, 4) for t in clock.ends],
              "tokens": [args.micro_batch * args.seq_len] * len(clock.ends), "sequences": len(data),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}}
    if cuda:
        result |= {"max_allocated_bytes": torch.cuda.max_memory_allocated(),
                   "max_reserved_bytes": torch.cuda.max_memory_reserved()}
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--micro-batch", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args(argv)
    print(RESULT_MARKER + json.dumps(train(args)), flush=True)


if __name__ == "__main__":
    main()
