"""QLoRA fine-tuning over a base loaded by its plan: data (data.py), LoRA adapters (adapter.py), the run's
settings (settings.py), checkpoints (checkpoints.py), the loop (loop.py, trainer.py), and the front door
that checks and loads everything in order (train.py)."""
