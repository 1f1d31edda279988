"""The training loop, optimiser, schedules, checkpoints and metric sinks."""
from tunesmith.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from tunesmith.training.loop import FitResult, causal_lm_loss, evaluate_loss, fit, micro_batch, total_steps

__all__ = ["fit", "FitResult", "causal_lm_loss", "evaluate_loss", "micro_batch", "total_steps",
           "list_checkpoints", "load_checkpoint", "save_checkpoint"]
