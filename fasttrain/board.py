"""A live board: loss/accuracy curves and progress that update while training.

In a notebook it shows a progress bar (ipywidgets) and one figure that is redrawn in
place; the final frame stays in the saved notebook as a PNG, so it shows in the book and
on reopening. Outside a notebook it prints one log line per record instead.
"""

from __future__ import annotations

import io
import sys
import time

from matplotlib.figure import Figure

from . import distributed
from .tables import format_table
from .train import Callback

DEFAULT_PANELS = {"loss": ["train_loss", "valid_loss"], "accuracy": ["train_acc", "valid_acc"]}


def in_notebook() -> bool:
    """True when running inside a Jupyter kernel (also under papermill and nbgrader)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class LiveBoard(Callback):
    """Curves of logged values, one panel per group of keys; a Learner callback or a plain logger.

    As a callback it logs each epoch's record. In your own loop call `board.log(step, **values)`
    and `board.close()` at the end. Under torch.distributed only rank 0 shows or prints anything.
    """

    order = 50

    def __init__(self, panels: dict[str, list[str]] | None = None, title: str = "", xlabel: str = "epoch",
                 logx: bool = False, min_interval: float = 1.0, notebook: bool | None = None):
        self.panels = dict(panels or DEFAULT_PANELS)
        self.title, self.xlabel, self.logx = title, xlabel, logx
        self.min_interval = min_interval
        self.notebook = in_notebook() if notebook is None else notebook
        self.xs: dict[str, list[float]] = {}
        self.ys: dict[str, list[float]] = {}
        self._handle = self._bar = self._label = None
        self._last_draw = 0.0
        self._closed = False
        self.silent = not distributed.is_main()
        if self.silent:
            self.notebook = False

    # --- logging ----------------------------------------------------------------------
    def log(self, x: float, **values: float) -> None:
        """Record `values` at position `x` and refresh the board (throttled to `min_interval`)."""
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.xs.setdefault(key, []).append(float(x))
                self.ys.setdefault(key, []).append(float(value))
        if self.silent:
            return
        if self.notebook:
            now = time.perf_counter()
            if now - self._last_draw >= self.min_interval:
                self._draw()
                self._last_draw = now
        else:
            shown = "  ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, (int, float)))
            print(f"{self.xlabel} {x:g}  {shown}", flush=True)

    def progress(self, done: int, total: int, text: str = "") -> None:
        """Show progress `done`/`total` (a widget in a notebook; a terminal bar when attached to one)."""
        if self.silent:
            return
        if self.notebook:
            self._ensure_widgets()
            if self._bar is not None:
                self._bar.max, self._bar.value = max(total, 1), done
                self._label.value = text
        elif sys.stdout.isatty():
            width = 30
            filled = int(width * done / max(total, 1))
            print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {text}", end="", flush=True)
            if done >= total:
                print()

    def close(self) -> Figure:
        """Draw the final frame (kept in the saved notebook) and return the figure."""
        fig = self.figure()
        if self.notebook and not self._closed:
            self._draw(fig)
            for widget in (getattr(self, "_box", None), self._bar, self._label):  # a finished bar is clutter
                if widget is not None:
                    widget.close()
        self._closed = True
        return fig

    # --- drawing ----------------------------------------------------------------------
    def figure(self) -> Figure:
        """A matplotlib Figure of every panel that has data."""
        panels = {name: [k for k in keys if k in self.ys] for name, keys in self.panels.items()}
        panels = {name: keys for name, keys in panels.items() if keys}
        fig = Figure(figsize=(4.2 * max(len(panels), 1), 3.2), dpi=90)
        for i, (name, keys) in enumerate(panels.items()):
            ax = fig.add_subplot(1, len(panels), i + 1)
            for key in keys:
                ax.plot(self.xs[key], self.ys[key], label=key, marker="." if len(self.xs[key]) < 30 else None)
            if self.logx:
                ax.set_xscale("log")
            ax.set_xlabel(self.xlabel)
            ax.set_title(name)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        if self.title:
            fig.suptitle(self.title)
        fig.tight_layout()
        return fig

    def _draw(self, fig: Figure | None = None) -> None:
        from IPython.display import Image, display

        fig = fig or self.figure()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        image = Image(data=buf.getvalue(), format="png")
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)

    def _ensure_widgets(self) -> None:
        if self._bar is not None:
            return
        try:
            import ipywidgets as widgets
            from IPython.display import display
        except ImportError:
            return
        self._bar = widgets.IntProgress(min=0, max=1, description="progress")
        self._label = widgets.Label()
        self._box = widgets.HBox([self._bar, self._label])
        display(self._box)

    # --- as a Learner callback ----------------------------------------------------------
    def before_fit(self) -> None:
        lrn = self.learner
        self._batches = len(lrn.train_data) if hasattr(lrn.train_data, "__len__") else 0

    def after_batch(self) -> None:
        lrn = self.learner
        if lrn.training and self._batches and (self.notebook or sys.stdout.isatty()):
            done = lrn.epoch * self._batches + lrn.batch_index + 1
            self.progress(done, lrn.epochs * self._batches, f"epoch {lrn.epoch + 1}/{lrn.epochs}")

    def after_epoch(self) -> None:
        record = dict(self.learner.record)
        epoch = record.pop("epoch")
        self.log(epoch, **record)

    def after_fit(self) -> None:
        self.close()


def format_history(history: list[dict], keys: list[str] | None = None) -> str:
    """A plain-text table of a Learner history (one row per epoch)."""
    if not history:
        return "(empty history)"
    keys = keys or [k for k in history[0] if k != "epoch"]
    return format_table(history, {"epoch": "epoch", **{k: k for k in keys}}, {k: ".4f" for k in keys}, markdown=False)
