"""Where step metrics go: metrics.jsonl always, TensorBoard and a progress bar when enabled."""
from __future__ import annotations

from typing import Any

from tunesmith._core import dist
from tunesmith._core.rundir import RunDir
from tunesmith.config import TrainConfig


class MetricSinks:
    """Fan one metrics record out to every sink (data parallel: process 0's; the others' have none)."""

    def __init__(self, run: RunDir, cfg: TrainConfig, total: int, initial: int = 0):
        self.run = run
        self.tb = None
        main = dist.is_main()
        if cfg.tensorboard and main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run.root / "tensorboard"), purge_step=initial + 1 if initial else None)
        self.bar = None
        if cfg.progress and main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train")

    def step(self, record: dict[str, Any], log: bool) -> None:
        if log:
            self.run.log_metrics(record)
            if self.tb is not None:
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)):
                        tag = f"eval/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                        self.tb.add_scalar(tag, value, record["step"])
        if self.bar is not None and "loss" in record:
            shown = {k: f"{record[k]:.4g}" for k in ("loss", "reward", "kl", "tokens_per_s") if k in record}
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
