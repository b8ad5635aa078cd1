"""Progress a user can follow: a Rich bar on a terminal, plain lines when output goes to a file.

* :class:`StepRichProgressBar`: Lightning's Rich bar, counting the step budget (the DataModules
  are step-indexed: ``max_steps`` is the budget and ``max_epochs`` is -1, which Lightning's bar
  shows as "Epoch 45/-2"): "Epoch 45" plus a ``step 490/4000`` item, no ``v_num``.
* :class:`LineProgressBar`: for logs (stdout not a terminal, where Rich prints nothing until the
  end): one line every ``every_n_seconds`` during fit (step, budget, latest loss, it/s, elapsed,
  ETA), a line per validation and per predict progress, the test loop's start.
* :func:`progress_bar_for` picks one of them for the output stream.

Both announce, before the metric callbacks of an evaluation run (``test`` or a fit validation
that evaluates), which callbacks are about to run; each metric then prints its own line when it
is computed (:func:`noisecls.callbacks.results.record_metric`).
"""

from __future__ import annotations

import logging
import math
import time
from typing import IO, Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

__all__ = ["LineProgressBar", "StepRichProgressBar", "format_duration", "progress_bar_for"]

log = logging.getLogger("noisecls.progress")


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``?`` for an unknown or infinite duration)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _format_metrics(metrics: dict[str, Any]) -> str:
    """``name value`` pairs (4 significant digits), without Lightning's ``v_num``."""
    parts = []
    for name, value in metrics.items():
        if name == "v_num":
            continue
        parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    return " · ".join(parts)


def _step_budget(trainer: L.Trainer) -> int | None:
    """The run's total optimizer steps (``max_steps``, else epochs x batches); None if unknown."""
    total = trainer.estimated_stepping_batches
    return int(total) if math.isfinite(total) else None


def _announce_evaluation(trainer: L.Trainer) -> None:
    """Log which metric callbacks are about to run (rank 0; only those that will evaluate)."""
    from noisecls.callbacks.results import EvaluationCallback, should_evaluate

    if not trainer.is_global_zero:
        return
    names = [
        type(cb).__name__
        for cb in trainer.callbacks
        if isinstance(cb, EvaluationCallback)
        and should_evaluate(trainer, int(getattr(cb, "every_n_epochs", 1) or 0))
    ]
    if names:
        stage = "test" if trainer.testing else f"validation at step {trainer.global_step}"
        log.info("%s: computing %s", stage, ", ".join(names))


class StepRichProgressBar(RichProgressBar):
    """Lightning's Rich bar, showing the step budget instead of "Epoch e/-2" under ``max_steps``."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"Epoch {current_epoch}"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k != "v_num"}
        if trainer.training and (budget := _step_budget(trainer)) is not None:
            items = {"step": f"{trainer.global_step}/{budget}", **items}
        return items

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_epoch_end(trainer, pl_module)
        _announce_evaluation(trainer)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_test_epoch_end(trainer, pl_module)
        _announce_evaluation(trainer)


class LineProgressBar(ProgressBar):
    """Plain progress lines for logs (no terminal control characters).

    During fit, every ``every_n_seconds`` (and at the end)::

        fit: step 120/4000 (3%) · train/loss 0.0312 · 2.31 it/s · elapsed 0:00:52 · ETA 0:27:58

    it/s is the rate since the previous line; the ETA extrapolates the average rate since the
    start of this run (validation included). After each validation during fit a line with its
    duration and the scalar ``val/`` metrics; in predict a line every ``every_n_seconds``.

    Args:
        every_n_seconds: seconds between two progress lines.
        stream: where the lines go (default: the ``noisecls.progress`` logger).
    """

    def __init__(self, every_n_seconds: float = 30.0, stream: IO[str] | None = None) -> None:
        super().__init__()
        if every_n_seconds < 0:
            raise ValueError("LineProgressBar needs every_n_seconds >= 0")
        self.every_n_seconds = every_n_seconds
        self.stream = stream
        self._enabled = True
        self._start = self._last = 0.0
        self._start_step = self._last_step = 0
        self._eval_start = 0.0

    # ---- ProgressBar interface -----------------------------------------------------------
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        self._emit(" ".join(str(a) for a in args))

    def _emit(self, line: str) -> None:
        if not self._enabled:
            return
        if self.stream is None:
            log.info(line)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    # ---- fit -----------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.perf_counter()
        self._start_step = self._last_step = trainer.global_step
        budget = _step_budget(trainer)
        self._emit(f"fit: step {trainer.global_step}/{budget if budget is not None else '?'}, "
                   f"a progress line every {self.every_n_seconds:g} s")  # fmt: skip

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if time.perf_counter() - self._last >= self.every_n_seconds:
            self._emit(self.fit_line(trainer, pl_module))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self._emit(self.fit_line(trainer, pl_module))

    def fit_line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        """The current fit progress line (and restart the it/s window)."""
        now = time.perf_counter()
        step = trainer.global_step
        rate = (step - self._last_step) / max(now - self._last, 1e-9)
        average = (step - self._start_step) / max(now - self._start, 1e-9)
        budget = _step_budget(trainer)
        parts = [
            f"fit: step {step}" + (f"/{budget} ({100 * step / budget:.0f}%)" if budget else "")
        ]
        if metrics := _format_metrics(self.get_metrics(trainer, pl_module)):
            parts.append(metrics)
        parts += [f"{rate:.3g} it/s", f"elapsed {format_duration(now - self._start)}"]
        if budget:
            remaining = (budget - step) / average if average > 0 else math.inf
            parts.append(f"ETA {format_duration(remaining)}")
        self._last, self._last_step = now, step
        return " · ".join(parts)

    # ---- validation / test / predict -----------------------------------------------------
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _announce_evaluation(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items()
                  if k.startswith("val/") and "=" not in k and v.numel() == 1}  # fmt: skip
        seconds = time.perf_counter() - self._eval_start
        line = f"validation at step {trainer.global_step} ({seconds:.1f} s)"
        self._emit(line + (": " + _format_metrics(values) if values else ""))

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._emit(f"test: {int(sum(trainer.num_test_batches))} batches of the test split")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _announce_evaluation(trainer)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.perf_counter()

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        now = time.perf_counter()
        total = int(sum(trainer.num_predict_batches))
        if now - self._last >= self.every_n_seconds or batch_idx + 1 == total:
            done = batch_idx + 1
            eta = (total - done) * (now - self._start) / done
            elapsed = format_duration(now - self._start)
            self._emit(
                f"predict: batch {done}/{total} · elapsed {elapsed} · ETA {format_duration(eta)}"
            )
            self._last = now


def progress_bar_for(stream: IO[str], every_n_seconds: float = 30.0) -> ProgressBar:
    """A :class:`StepRichProgressBar` when ``stream`` is a terminal, else a
    :class:`LineProgressBar` printing a line every ``every_n_seconds``."""
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return StepRichProgressBar()
    return LineProgressBar(every_n_seconds)
