"""How long drawing the next token takes: `python -m benchmarks.sampling [rows=32 vocab=49152 steps=16 reps=5]`.

Times, in turns, the engine's draw (`tunesmith.models.generate.draw`: one uniform number per row against
the running sums of the probabilities) and `torch.multinomial` (an exponential number for every vocabulary
entry) on the probabilities of random logits at temperature 0.7, `steps` draws a repetition, on this
machine's default device (CUDA where there is one). With `model=default` it times instead whole
generations of SmolLM2-135M-Instruct with a LoRA adapter, shaped like a GRPO step of `examples/grpo.yaml`
(4 arithmetic prompts x 8 samples, 16 new tokens at temperature 0.7), once with each draw, in turns.
Prints the median and every repetition.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable

import torch

from tunesmith.models import generate as engine


def multinomial(probs: torch.Tensor, generator: Any = None) -> torch.Tensor:
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _turns(runs: dict[str, Callable[[int], None]], reps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run(rep)
            times[name].append(time.perf_counter() - start)
    return times


def draws(rows: int = 32, vocab: int = 49152, steps: int = 16, reps: int = 5) -> dict[str, list[float]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device=device).manual_seed(0)
    probs = (torch.randn(rows, vocab, device=device, generator=generator) * 3 / 0.7).softmax(-1)

    def timed(draw: Callable) -> Callable[[int], None]:
        def run(rep: int) -> None:
            for _ in range(steps):
                draw(probs, generator)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run
    timed(engine.draw)(0), timed(multinomial)(0)  # warm-up
    return _turns({"draw": timed(engine.draw), "multinomial": timed(multinomial)}, reps)


def generations(reps: int = 5) -> dict[str, list[float]]:
    import json
    from pathlib import Path

    from tunesmith.config import MethodConfig, ModelConfig
    from tunesmith.data.render import end_of_turn_ids, render_prompt
    from tunesmith.models.load import load_model_and_tokenizer
    from tunesmith.models.methods import apply_method

    model, tokenizer = load_model_and_tokenizer(ModelConfig(name="default"), method="lora")
    model = apply_method(model, MethodConfig(kind="lora", lora={"r": 16, "alpha": 32, "dropout": 0.0,
                                                                "target_modules": "all-linear"}), tokenizer)
    lines = Path("examples/data/arithmetic/train.jsonl").read_text().splitlines()[:4]
    prompts = [render_prompt(tokenizer, json.loads(line)["messages"][:1]) for line in lines]
    batch = [p for p in prompts for _ in range(8)]
    stop = end_of_turn_ids(tokenizer)
    real = engine.draw

    def with_draw(draw: Callable) -> Callable[[int], None]:
        def run(rep: int) -> None:
            engine.draw = draw
            try:
                engine.generate(model, tokenizer, batch, stop_ids=stop, max_new_tokens=16, temperature=0.7, seed=rep)
            finally:
                engine.draw = real
        return run
    with_draw(real)(0)  # warm-up
    return _turns({"draw": with_draw(real), "multinomial": with_draw(multinomial)}, reps)


def main() -> None:
    kwargs = dict(arg.split("=", 1) for arg in sys.argv[1:])
    if kwargs.pop("model", None) == "default":
        times = generations(int(kwargs.get("reps", 5)))
        what = "a GRPO-shaped generation (32 rows, 16 new tokens), seconds"
    else:
        times = draws(**{k: int(v) for k, v in kwargs.items()})
        what = f"{kwargs.get('steps', 16)} draws, seconds"
    for name, seconds in times.items():
        print(f"{name:12s} median {statistics.median(seconds):.3f}  ({what}; each: "
              f"{', '.join(f'{s:.3f}' for s in seconds)})")


if __name__ == "__main__":
    main()
