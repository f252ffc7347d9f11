"""A progress bar: tqdm when importable, else a one-line text bar on stderr."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """Counts finished steps out of ``total`` and shows the current step's description."""

    def __init__(self, total: int, *, enabled: bool = True) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled
        self.start = time.perf_counter()
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total, unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self._bar = None

    def describe(self, text: str) -> None:
        """Shows what runs now."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description_str(text)
        else:
            self._text(text)

    def step(self, text: str = "") -> None:
        """Marks one step finished."""
        self.done = min(self.done + 1, self.total)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
        else:
            self._text(text)

    def write(self, line: str) -> None:
        """Prints a line without breaking the bar."""
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")

    def _text(self, text: str) -> None:
        width = 30
        filled = width * self.done // self.total
        elapsed = time.perf_counter() - self.start
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {elapsed:6.0f}s {text[:60]:<60}")
        sys.stderr.flush()
