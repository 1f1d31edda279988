"""The run directory: the one contract between training and everything else (see docs/architecture.md).

runs/<name>/
  config.yaml  status.json  metrics.jsonl  events.jsonl  checkpoints/step-N/  final/  eval/

Data parallel (several processes, `tunesmith._core.dist`), process 0 writes it: in the others the writers
here do nothing.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from tunesmith._core import dist
from tunesmith._core.errors import TunesmithError


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so a reader never sees a half-written file (write a sibling, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _settings_of(path: Path) -> Path:
    return path.with_name(path.stem + ".settings.json")


def cached_result(path: Path, settings: Any) -> Any | None:
    """The JSON result at `path` if it was measured with `settings` (`record_settings` wrote them beside it,
    as `<name>.settings.json`), else None: a resumed run measures again what its settings changed."""
    recorded = _settings_of(path)
    if path.exists() and recorded.exists() and json.loads(recorded.read_text()) == settings:
        return json.loads(path.read_text())
    return None


def record_settings(path: Path, settings: Any) -> None:
    """The settings the result at `path` was measured with, for `cached_result`."""
    write_json_atomic(_settings_of(path), settings)


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    """`rows` as JSONL (UTF-8, one object a line, "\\n" line ends), written whole or not at all: a sibling
    `.partial` file renamed into place, so neither a reader nor a crash ever sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        with tmp.open("w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    except BaseException:
        tmp.unlink(missing_ok=True)  # the file at `path`, if any, is as it was
        raise
    os.replace(tmp, path)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, as Ctrl-C's KeyboardInterrupt is."""


@contextlib.contextmanager
def _terminated_as_interrupt() -> Iterator[None]:
    """SIGTERM raises `Terminated` for the duration (main thread only: signals are delivered there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class RunDir:
    """Paths and small writers for one run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def prepare(self, config_text: str, resume: bool) -> "RunDir":
        """Create the directory and record the config; refuse to overwrite an earlier run unless resuming."""
        if not dist.is_main():
            return self
        if not resume and (self.metrics.exists() or self.final.exists()
                           or (self.checkpoints.is_dir() and any(self.checkpoints.iterdir()))):
            raise TunesmithError(f"{self.root} already holds a run; pass --resume to continue it, "
                                 "or choose another output_dir=...")
        if not resume and not self.status.exists() and self.root.is_dir() and any(self.root.iterdir()):
            # a folder of something else (data, another tool's output): writing a run into it would mix the two
            raise TunesmithError(f"{self.root} is not empty and holds no tunesmith run; choose another "
                                 "output_dir=... (a new or empty folder)")
        self.create()
        if resume and self.config.exists() and self.config.read_text() != config_text:
            # keep what ran before; config.yaml always holds the config of the latest start
            self.config.replace(self.root / "config.previous.yaml")
            self.event("config_changed", "the config differs from the one the run started with "
                                         "(the earlier one is config.previous.yaml)")
        self.config.write_text(config_text)
        return self

    @contextlib.contextmanager
    def guard(self, description: str) -> Iterator["RunDir"]:
        """Mark the run running, and failed or cancelled (with the error) if the body raises. SIGTERM (a
        scheduler's preemption, `docker stop`, `kill`) cancels it as Ctrl-C does: without a handler the
        process would die at once and leave the run marked running for good."""
        self.set_status("running", step=0)
        self.event("started", description)
        try:
            with _terminated_as_interrupt():
                yield self
        except KeyboardInterrupt as err:
            why = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
            self.set_status("cancelled", step=self.read_status().get("step", 0), error=why)
            self.event("cancelled", f"{why} by the user" if why == "interrupted" else why)
            raise
        except Exception as err:
            self.set_status("failed", step=self.read_status().get("step", 0), error=f"{type(err).__name__}: {err}")
            self.event("failure", f"{type(err).__name__}: {err}")
            raise

    def create(self) -> "RunDir":
        if not dist.is_main():
            return self
        for d in (self.root, self.checkpoints, self.eval):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def set_status(self, state: str, step: int = 0, error: str | None = None, **extra: Any) -> None:
        """state is one of running / succeeded / failed / cancelled."""
        if not dist.is_main():
            return
        obj = {"state": state, "step": step, "updated": time.time(), "error": error, **extra}
        write_json_atomic(self.status, obj)

    def read_status(self) -> dict[str, Any]:
        return json.loads(self.status.read_text()) if self.status.exists() else {}

    def event(self, kind: str, message: str, **data: Any) -> None:
        """Append one human-readable event."""
        if not dist.is_main():
            return
        rec = {"time": time.time(), "event": kind, "message": message, **data}
        with self.events.open("a") as f:
            f.write(json.dumps(rec, default=str) + "\n")

    def log_metrics(self, record: dict[str, Any]) -> None:
        if not dist.is_main():
            return
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records past `after_step`: a resumed run re-logs them, so the file has no duplicates."""
        if not dist.is_main():
            return
        write_jsonl_atomic(self.metrics, [r for r in self.read_metrics() if r.get("step", 0) <= after_step])
