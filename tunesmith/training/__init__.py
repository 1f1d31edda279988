"""The training loop, optimiser, schedules, checkpoints and metric sinks."""
from tunesmith.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from tunesmith.training.loop import FitResult, causal_lm_loss, evaluate, evaluate_loss, fit, micro_batch, total_steps
from tunesmith.training.precision import precision_autocast, resolve_precision, training_autocast

__all__ = ["fit", "FitResult", "causal_lm_loss", "evaluate", "evaluate_loss", "precision_autocast", "resolve_precision",
           "training_autocast", "micro_batch", "total_steps", "list_checkpoints", "load_checkpoint",
           "save_checkpoint"]
