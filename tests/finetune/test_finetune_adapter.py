"""A trained adapter away from the process that trained it: `heavylift run --adapter` continues a prompt as
the model in the training process does, `serve --adapter` serves the same model, and `heavylift merge`
writes a bf16 model that computes what base and adapter compute together."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from finetune.conftest import SEQ_LEN
from heavylift.runtime.session import encode

PROMPT = "the quick brown"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def in_process(base, texts, tmp_path_factory):
    """A fine-tune run through the library, its trained model kept: (model, tokenizer, --out)."""
    from heavylift.finetune.train import Options, load_finetune, prepare_finetune

    options = Options(out=tmp_path_factory.mktemp("in-process") / "out")
    job = prepare_finetune(str(base), texts["train"], {"seq_len": SEQ_LEN, "steps": 20, "lr": 1e-2}, options)
    trainer = load_finetune(job, options)
    for _ in trainer.run():
        pass
    trainer.model.eval()
    return trainer.model, job.base.tokenizer, options.out


@torch.no_grad()
def _greedy(model, ids: list[int], eos: int) -> list[int]:
    """Greedy tokens after `ids`, each from a full forward of everything so far (no cache)."""
    out = []
    for _ in range(NEW_TOKENS):
        token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(token)
        if token == eos:
            break
    return out


def test_run_with_the_adapter_continues_as_the_trained_model(in_process, base, capsys):
    model, tokenizer, out = in_process
    ids = encode(tokenizer, PROMPT, raw=True)
    expected = tokenizer.decode(_greedy(model, ids, tokenizer.eos_token_id), skip_special_tokens=True)
    code, stdout, err = run_cli(capsys, "run", str(base), "--adapter", str(out), "--prompt", PROMPT, "--raw",
                                "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS), "--context", "64",
                                "--quant", "nf4-dq", "--json")
    assert code == 0, err
    assert err.splitlines()[0] == f"adapter {out}: transformers runs the model (the fast engine does not apply LoRA)"
    result = json.loads(stdout)
    assert (result["engine"], result["quant"]) == ("transformers", "nf4-dq")
    assert result["text"] == expected
    code, stdout, err = run_cli(capsys, "run", str(base), "--prompt", PROMPT, "--raw", "--temperature", "0",
                                "--max-new-tokens", str(NEW_TOKENS), "--context", "64", "--quant", "nf4-dq", "--json")
    assert code == 0 and json.loads(stdout)["text"] != expected  # the base alone continues otherwise


def test_the_saved_adapter_reproduces_the_trained_models_logits(in_process, base):
    """Exactly, over a base prepared as for training; to bf16's precision over the base as `run` loads it, which
    keeps embeddings, norms and head in bf16 where training holds them in float32 (QLoRA's preparation)."""
    import heavylift
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from heavylift.api import prepare
    from heavylift.finetune.adapter import apply_adapter, attach_lora

    model, tokenizer, out = in_process
    ids = torch.tensor([encode(tokenizer, PROMPT + " fox jumps over", raw=True)])
    fresh = attach_lora(prepare(str(base), quant="nf4-dq", context=SEQ_LEN, engine="transformers").load_weights().model,
                        heavylift.Training().target_modules, 16, 32, 0.05, True)
    set_peft_model_state_dict(fresh, load_file(str(out / "adapter_model.safetensors")))
    fresh.eval()
    session = heavylift.load(str(base), quant="nf4-dq", context=64, engine="transformers")
    with torch.no_grad():
        trained, reloaded = model(input_ids=ids).logits, fresh(input_ids=ids).logits
        plain = session.model(input_ids=ids).logits.float()
        apply_adapter(session.model, out)
        run = session.model(input_ids=ids).logits.float()
    assert torch.equal(reloaded, trained)
    assert (run - plain).abs().max() > 1.0  # the adapter changes the logits...
    # ...to the trained model's, within 3% of the largest logit (bf16 keeps 8 significant bits)
    assert (run - trained).abs().max() < 0.03 * trained.abs().max()
    assert torch.equal(run.argmax(-1), trained.argmax(-1))


def test_serve_with_the_adapter_runs_it_on_transformers(in_process, base):
    from rich.console import Console

    from heavylift.commands.serve import _scheduler, plan_slots
    from heavylift.serve.backends import TransformersBackend

    model, tokenizer, out = in_process
    prepared, seqs = plan_slots(str(base), "nf4-dq", None, 64, 1, False, "transformers")
    scheduler = _scheduler(Console(stderr=True), prepared, seqs, 1, 16, out)
    assert isinstance(scheduler.backend, TransformersBackend)
    ids = encode(tokenizer, PROMPT, raw=True)
    *_, (logits, _) = scheduler.backend.prefill(0, ids, None, 16)
    assert int(logits.argmax()) == _greedy(model, ids, tokenizer.eos_token_id)[0]


def test_merge_writes_a_bf16_model_that_computes_base_plus_adapter(in_process, base, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, tokenizer, adapter = in_process
    merged = tmp_path / "merged"
    code, _, err = run_cli(capsys, "merge", str(base), "--adapter", str(adapter), "--out", str(merged))
    assert (code, err) == (0, f"merged {adapter} into {base}: {merged} (bf16 weights, config, tokenizer)\n")
    assert sorted(p.name for p in merged.iterdir()) == ["chat_template.jinja", "config.json", "generation_config.json",
                                                        "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((merged / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    ids = torch.tensor([encode(tokenizer, PROMPT + " fox jumps over", raw=True)])
    with torch.no_grad():
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                                              str(adapter))(input_ids=ids).logits.float()
        written = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)(input_ids=ids).logits.float()
    assert torch.allclose(written, reference, atol=0.1)
    assert torch.equal(written.argmax(-1), reference.argmax(-1))
