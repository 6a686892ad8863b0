"""What `erw pipeline run-local` shows: one line per step with its duration and key numbers, the
progress of training and sampling, and (from local.py) the final summary.

Everything the steps print (kfp.local's executor input and output dumps, per-task artifact
listings, the trainer's full log) goes to a log file instead; `--verbose` shows it as well. When
a step fails, its last lines are shown with the log's path, so the reason is on screen.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Iterator, TextIO

ANSI = re.compile(r"\x1b\[[0-9;]*m")
TASK_STARTED = re.compile(r"Executing task '([^']+)'")
TASK_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
CACHE_HIT = re.compile(r"Task (\S+) cache hit")
# Lines that show progress inside a step: the trainer's log lines (rank 0), sampling batches, the
# small networks' fitting.
PROGRESS = re.compile(r"\b(?:warmup|train) step \d+/\d+|\bbatch \d+/\d+:|^step \d+/\d+ loss")
# The line that sums a step up, by what it starts with (after any torchrun/TorchX prefix).
KEY_LINES = re.compile(
    r"(source \S+: |worker \d+/\d+: (?:wrote|encoded)|merged \d+ shards|wrote \d+ samples"
    r"|\{\"fid\"|(?:not )?promoted /|evaluator accuracy|encoder accuracy|creating \S+: erw)",
    re.IGNORECASE,
)
FAILURE_LINES = 40  # of a failing step's output, shown on screen


def _trainer_line(text: str) -> str:
    """'train step 200/2400 | loss -0.35 | loss_denoise 0.40 ... | 54.6 samples/s | data wait 4%' ->
    the step, the losses and the throughput, without the rest."""
    parts = [p.strip() for p in text.split("|")]
    keep = [parts[0]] + [
        p for p in parts[1:] if p.startswith(("loss_denoise", "loss_align", "loss ")) or "samples/s" in p
    ]
    return "  ".join(keep)


def _key_summary(text: str) -> str:
    """The evaluation's JSON scores as 'FID 3.1, class accuracy 92.5%'; other key lines as they are."""
    if text.startswith("{"):
        try:
            scores = json.loads(text)
        except ValueError:
            return text
        parts = [f"FID {scores['fid']:.2f}"] if scores.get("fid") is not None else []
        if scores.get("class_accuracy") is not None:
            parts.append(f"class accuracy {100 * scores['class_accuracy']:.1f}%")
        return ", ".join(parts) + f" ({scores.get('num_samples', '?')} samples)"
    return text


class StepConsole(io.TextIOBase):
    """A text stream for sys.stdout during a local run: all of it to `log`, a digest to `screen`."""

    def __init__(self, log: TextIO, screen: TextIO, verbose: bool = False):
        self.log, self.screen, self.verbose = log, screen, verbose
        self.partial = ""
        self.started: dict[str, list[float]] = collections.defaultdict(
            list
        )  # running tasks (parallel ones share a name)
        self.task: str | None = None  # the latest task started: key lines are credited to it
        # Key lines per task name, oldest first; parallel tasks of one name each take one.
        self.keys: dict[str, list[str]] = collections.defaultdict(list)
        self.recent: collections.deque[str] = collections.deque(maxlen=FAILURE_LINES)
        self.done = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log.write(text)
        if self.verbose:
            self.screen.write(text)
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        for line in lines:
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.screen.flush()

    def _show(self, text: str) -> None:
        if not self.verbose:
            self.screen.write(text + "\n")
            self.screen.flush()

    def _line(self, raw: str) -> None:
        line = ANSI.sub("", raw).strip()
        if not line:
            return
        self.recent.append(line)
        if started := TASK_STARTED.search(line):
            self.task = started.group(1)
            self.started[self.task].append(time.monotonic())
        elif finished := TASK_FINISHED.search(line):
            self._finished(finished.group(1), finished.group(2))
        elif hit := CACHE_HIT.search(line):
            self.done += 1
            self._show(f"[{self.done}] {hit.group(1):<16} from cache")
        elif progress := PROGRESS.search(line):
            text = line[progress.start() :]
            self._show("      " + (_trainer_line(text) if "|" in text else text))
            if "|" in text and self.task:  # a training step's last log line sums it up
                self.keys[self.task].append(_trainer_line(text))
        elif key := KEY_LINES.search(line):
            if self.task:
                self.keys[self.task].append(_key_summary(line[key.start() :]))
            else:  # outside the DAG: creating the demo's inputs
                self._show(line[key.start() :])

    def _finished(self, task: str, status: str) -> None:
        starts, keys = self.started[task], self.keys[task]
        seconds = time.monotonic() - starts.pop(0) if starts else 0.0
        # The first of several parallel tasks takes the oldest key line; the last one, the latest.
        key = (keys.pop(0) if starts else keys[-1]) if keys else ""
        if not starts:
            keys.clear()
        self.done += 1
        if status.upper() == "SUCCESS":
            self._show(f"[{self.done}] {task:<16} {seconds:6.1f}s  {key}".rstrip())
        else:
            self._show(f"[{self.done}] {task:<16} {seconds:6.1f}s  FAILED; the last lines before it:")
            for line in self.recent:
                self._show("      " + line)
        if not any(self.started.values()):
            self.task = None


def log_file(directory: str | Path) -> Path:
    """A new log file for one run, under `directory`/logs."""
    path = Path(directory, "logs", time.strftime("run-local-%Y%m%d-%H%M%S.log"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def step_console(path: Path, verbose: bool = False) -> Iterator[StepConsole]:
    """Send sys.stdout through a StepConsole writing the full text to `path` while inside."""
    screen = sys.stdout
    screen.write(f"full log: {path}\n")
    screen.flush()
    with path.open("a", buffering=1) as log:
        console = StepConsole(log, screen, verbose)
        # kfp.local reports cache hits through the root logger, outside the tasks' own log setup.
        records = logging.StreamHandler(console)
        records.setLevel(logging.INFO)
        logging.getLogger().addHandler(records)
        try:
            with contextlib.redirect_stdout(console):
                yield console
        finally:
            logging.getLogger().removeHandler(records)
            if console.partial:
                console.write("\n")
