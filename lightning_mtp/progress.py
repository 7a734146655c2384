"""Progress that shows in a terminal and in a log alike.

A rich progress bar with ``transient=True`` prints nothing when stdout is not a terminal (CI, ``make demo | tee
log``), and Lightning's tqdm bar then writes carriage-return updates that a log shows as one endless line. Here:

- :func:`progress_bar`: a rich bar on a terminal; elsewhere :class:`PlainProgress`, which prints one line when a
  task starts, then at most one every ``interval`` seconds (done/total, rate, time left), and one when it ends;
- :class:`LogProgressBar`: Lightning's progress bar as such lines (training steps, rate, time left, the logged
  metrics, the validation results), which ``lightning-mtp fit`` uses when stdout is not a terminal.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from rich.progress import Progress

__all__ = ["LogProgressBar", "PlainProgress", "is_terminal", "progress_bar"]


def is_terminal() -> bool:
    """Does stdout go to a terminal (where a live bar can redraw itself)?"""
    return sys.stdout.isatty()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class _Task:
    description: str
    total: float
    unit: str
    done: float = 0.0
    started: float = 0.0
    last_line: float = 0.0


class PlainProgress:
    """The part of ``rich.progress.Progress`` the package uses (``add_task``, ``advance``, a ``with`` block),
    printed as plain lines on stdout: when a task starts, at most every ``interval`` seconds, and when it ends."""

    def __init__(self, interval: float = 10.0, disable: bool = False) -> None:
        self.interval, self.disable = interval, disable
        self.tasks: list[_Task] = []
        self.lock = threading.Lock()  # tasks advance from worker threads too (distill's server requests)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, description: str, total: float, unit: str = "it", **fields: Any) -> int:
        now = time.monotonic()
        self.tasks.append(_Task(description, total, unit, started=now, last_line=now))
        self._print(f"{description}: 0/{total:,.0f} {unit}")
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        with self.lock:
            task = self.tasks[task_id]
            task.done += advance
            now = time.monotonic()
            if task.done >= task.total or now - task.last_line >= self.interval:
                task.last_line = now
                self._print(self._line(task, now))

    def _line(self, task: _Task, now: float) -> str:
        elapsed = max(now - task.started, 1e-9)
        rate = task.done / elapsed
        line = (f"{task.description}: {task.done:,.0f}/{task.total:,.0f} {task.unit} ({task.done / task.total:.0%}), "
                f"{rate:.3g} {task.unit}/s")
        if task.done < task.total and rate > 0:
            return line + f", ~{_duration((task.total - task.done) / rate)} left"
        return line + f", done in {_duration(elapsed)}"

    def _print(self, line: str) -> None:
        if not self.disable:
            print(line, flush=True)


def progress_bar(disable: bool = False, interval: float = 10.0) -> Progress | PlainProgress:
    """A transient rich bar on a terminal, :class:`PlainProgress` lines elsewhere; nothing when ``disable``."""
    if is_terminal():
        return Progress(disable=disable, transient=True)
    return PlainProgress(interval=interval, disable=disable)


class LogProgressBar(ProgressBar):
    """Lightning's progress as plain lines: the first training step, then at most one line every ``interval``
    seconds (step, rate, time left, the progress-bar metrics such as the loss; the batch of a long validation),
    each validation's results, the end; the same for prediction (``lightning-mtp distill``)."""

    def __init__(self, interval: float = 15.0) -> None:
        super().__init__()
        self.interval = interval
        self.enabled = True
        self._started = self._last = 0.0
        self._first_step = self._predicted = self._validated = 0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = self._last = time.monotonic()
        self._first_step = trainer.global_step  # a resumed fit starts where its checkpoint left off

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
                           ) -> None:
        now = time.monotonic()
        first = trainer.global_step == self._first_step + 1
        if first or now - self._last >= self.interval:
            self._last = now
            self._line(trainer, pl_module, now)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._line(trainer, pl_module, time.monotonic(), end=True)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = self._last = time.monotonic()
        self._predicted = 0

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        self._predicted += 1
        now = time.monotonic()
        total = self.total_predict_batches_current_dataloader
        if self.enabled and (self._predicted == 1 or self._predicted == total or now - self._last >= self.interval):
            self._last = now
            rate = self._predicted / max(now - self._started, 1e-9)
            self.print(f"{self.predict_description}: batch {self._predicted}/{total}, {rate:.2f} batches/s")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validated = 0

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._validated += 1
        now = time.monotonic()
        if self.enabled and not trainer.sanity_checking and now - self._last >= self.interval:  # a long validation
            self._last = now
            # trainer.num_val_batches, not ProgressBar.total_val_batches_current_dataloader: that one needs the index
            # of the current loader, which only the tqdm and rich bars record
            self.print(f"validating at step {trainer.global_step}: batch {self._validated}/"
                       f"{trainer.num_val_batches[dataloader_idx]}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.enabled:
            return
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k.startswith("val")}
        if metrics:
            self.print(f"validation at step {trainer.global_step}: {_metrics(metrics)}")

    def _line(self, trainer: L.Trainer, pl_module: L.LightningModule, now: float, end: bool = False) -> None:
        if not self.enabled:
            return
        steps = trainer.global_step - self._first_step
        elapsed = max(now - self._started, 1e-9)
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        line = f"step {trainer.global_step}" + (f"/{total}" if total else "")
        if end:  # Lightning has moved the epoch on by now: leave it out
            line += f", {steps / elapsed:.2f} steps/s, done in {_duration(elapsed)}"
        else:
            line += f" (epoch {trainer.current_epoch}), {steps / elapsed:.2f} steps/s"
            if total and steps:
                line += f", ~{_duration((total - trainer.global_step) * elapsed / steps)} left"
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items()
                   if not k.startswith("val") and k != "v_num"}  # v_num: the logger's run number, not progress
        self.print(line + (f"; {_metrics(metrics)}" if metrics else ""))

    def print(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("flush", True)  # a log shows each line as it comes
        print(*args, **kwargs)


def _metrics(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
