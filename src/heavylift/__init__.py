"""heavylift: plan, load and run the largest open LLMs on the GPUs you actually have."""

from __future__ import annotations

from .api import load, plan, plan_training  # load imports torch only when called (needs `pip install 'heavylift[run]'`)
from .errors import HeavyliftError
from .planner.plan import Plan
from .planner.training import Training, TrainingPlan

__all__ = ["plan", "plan_training", "load", "evaluate", "Plan", "Training", "TrainingPlan", "Session",
           "HeavyliftError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`heavylift.Session`, the type `load` returns, and `heavylift.evaluate`, imported (with torch) only when
    asked for."""
    if name == "Session":
        from .runtime.session import Session

        return Session
    if name == "evaluate":
        from .evaluation.evaluate import evaluate

        return evaluate
    raise AttributeError(f"module 'heavylift' has no attribute {name!r}")
