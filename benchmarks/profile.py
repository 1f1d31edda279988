"""Where one arm's time goes: `python -m benchmarks.profile ARM key=value ... [--skip N] [--out DIR] [--trace]`.

Runs the arm in this process under `torch.profiler`, recording only its timed region and, for the training
arms, only the steps after the first `--skip` (default 1: the first step compiles and autotunes kernels).
Writes DIR/profile-ARM.md (and prints it):
- the recorded wall time against the time the GPU spent in kernels: the rest is the GPU waiting for the
  host (Python, launches, synchronisations);
- GPU time by kind of kernel (matmul, attention, fused Triton kernels, elementwise, copies, optimiser);
- the kernels that took longest, the host-side operators that took longest, and the host's waits for the
  device.
On a machine without CUDA the same report covers the CPU operators. `--trace` also saves a Chrome trace.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

# kind of a kernel (or, on CPU, of an aten operator), by the first pattern its name matches
CATEGORIES = [
    ("attention", re.compile(r"flash|fmha|attention|attn|sdpa", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam|foreach", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|aten::(mm|addmm|bmm|baddbmm|matmul|linear)$"
                          r"|sm\d\d_", re.I)),
    ("fused (triton)", re.compile(r"triton|liger|_kernel$|rms_norm|rope|swiglu", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|cat|aten::(to|_to_copy|clone|contiguous)$", re.I)),
    ("views (no compute)", re.compile(r"aten::(t|view|_unsafe_view|transpose|reshape|expand|slice|select|as_strided"
                                      r"|permute|unsqueeze|squeeze|detach|alias|split|narrow|empty|empty_like)$")),
    ("elementwise / reduction", re.compile(r"elementwise|vectorized|reduce|unrolled|softmax|aten::", re.I)),
]
WAITS = re.compile(r"synchronize|cudaMemcpy(Async)?$|cudaStreamWaitEvent|aten::item|aten::_local_scalar_dense",
                   re.I)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


@dataclass
class Profile:
    """Active while an arm runs under `benchmarks.profile`: the arm opens `region()` around what it times
    and calls `step()` after each training step; recording starts after `skip` steps."""

    skip: int = 1
    trace: Path | None = None
    steps: int = 0
    recorded_steps: int = 0
    wall: float = 0.0
    prof: Any = None
    _t0: float | None = None

    @contextlib.contextmanager
    def region(self) -> Iterator[None]:
        from torch.profiler import ProfilerActivity, profile, schedule
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        # wait `skip` steps (nothing recorded), then record until the region ends
        sched = schedule(wait=self.skip, warmup=0, active=10**9) if self.skip else None
        self.prof = profile(activities=activities, schedule=sched)
        self._t0 = None if self.skip else time.perf_counter()
        with self.prof:
            yield
            _sync()
        if self._t0 is not None:
            self.wall = time.perf_counter() - self._t0
        if self.trace:
            self.prof.export_chrome_trace(str(self.trace))

    def step(self) -> None:
        if self.prof is None:
            return
        _sync()
        self.steps += 1
        self.prof.step()
        if self.steps == self.skip:
            self._t0 = time.perf_counter()
        elif self.steps > self.skip:
            self.recorded_steps += 1


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device_us(e: Any) -> float:
    return float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0) or 0.0)


def _fmt_ms(us: float) -> str:
    return f"{us / 1e3:,.1f}"


def report(p: Profile, title: str, top: int = 25) -> str:
    """The markdown report of a finished `Profile`."""
    averages = p.prof.key_averages()
    gpu = torch.cuda.is_available()
    kernels = [e for e in averages if _device_us(e) > 0] if gpu else []
    rows = kernels if gpu else [e for e in averages if e.key.startswith("aten::")]
    time_of = _device_us if gpu else (lambda e: float(e.self_cpu_time_total))
    busy = sum(time_of(e) for e in rows)
    wall_us = p.wall * 1e6
    lines = [f"# Profile: {title}", ""]
    steps = f"{p.recorded_steps} steps after the first {p.skip}" if p.skip else "the whole timed region"
    lines.append(f"Recorded {steps}: {p.wall:.3f} s of wall time.")
    if gpu:
        share = busy / wall_us if wall_us else 0.0
        lines.append(f"GPU kernels ran {busy / 1e6:.3f} s of it ({share:.0%}); the other {1 - share:.0%} the GPU "
                     "waited for the host (kernels on several streams count once each, so overlap can push "
                     "this over 100%).")
    else:
        lines.append(f"No CUDA: the tables below are CPU operators (self time, {busy / 1e6:.3f} s in aten ops).")
    by_cat: dict[str, float] = {}
    for e in rows:
        by_cat[category(e.key)] = by_cat.get(category(e.key), 0.0) + time_of(e)
    lines += ["", f"| kind | {'GPU' if gpu else 'CPU'} ms | share |", "|---|---|---|"]
    for label, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {label} | {_fmt_ms(us)} | {us / busy:.1%} |" if busy else f"| {label} | 0 | |")
    lines += ["", f"Top {top} {'kernels' if gpu else 'operators'}:", "",
              "| name | kind | calls | ms | share |", "|---|---|---|---|---|"]
    for e in sorted(rows, key=time_of, reverse=True)[:top]:
        name = e.key if len(e.key) <= 90 else e.key[:87] + "..."
        lines.append(f"| `{name}` | {category(e.key)} | {e.count} | {_fmt_ms(time_of(e))} | "
                     f"{time_of(e) / busy:.1%} |" if busy else f"| `{name}` | | {e.count} | 0 | |")
    host = sorted((e for e in averages if e.self_cpu_time_total > 0 and not e.key.startswith("ProfilerStep")),
                  key=lambda e: e.self_cpu_time_total, reverse=True)
    lines += ["", f"Top {top} host-side operators by self time:", "", "| name | calls | self ms |", "|---|---|---|"]
    for e in host[:top]:
        lines.append(f"| `{e.key[:90]}` | {e.count} | {_fmt_ms(e.self_cpu_time_total)} |")
    waits = [e for e in averages if WAITS.search(e.key)]
    if waits:
        lines += ["", "Host waits for the device (and scalar reads that imply one):", "", "| name | calls | ms |",
                  "|---|---|---|"]
        for e in sorted(waits, key=lambda e: e.cpu_time_total, reverse=True):
            lines.append(f"| `{e.key}` | {e.count} | {_fmt_ms(e.cpu_time_total)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    from benchmarks import arms
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arm", choices=sorted(arms.ARMS))
    ap.add_argument("settings", nargs="*", help="key=value arguments of the arm")
    ap.add_argument("--skip", type=int, default=1, help="steps run before recording starts (training arms)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--trace", action="store_true", help="also save a Chrome trace")
    a = ap.parse_args(argv)
    kwargs = {k: arms._value(v) for k, v in (s.split("=", 1) for s in a.settings)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stepped = a.arm in arms.STEPPED_ARMS
    p = Profile(skip=a.skip if stepped else 0, trace=out / f"trace-{a.arm}.json" if a.trace else None)
    arms.PROFILE = p
    try:
        result = arms.ARMS[a.arm](**kwargs)
    finally:
        arms.PROFILE = None
    if p.prof is None:
        raise SystemExit(f"{a.arm} has no profiled region")
    title = " ".join([a.arm] + a.settings)
    text = report(p, title, a.top) + "\nArm result: `" + json.dumps(result) + "`\n"
    path = out / f"profile-{a.arm}.md"
    path.write_text(text)
    print(text)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
