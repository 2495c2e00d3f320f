"""The one progress event every stage reports through `progress(Event)`; the UI draws it, tests collect it.

A stage counts work in tasks ("revise", "eval harm", "train", "reference log-probs"): the first event of a
task may give its `total` and the items already `done` (resume); later ones `advance` it and add `tokens`.
Training steps carry their metrics row in `metrics`; `message` is a line to show (counts, warnings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Event:
    task: str  # what is being counted
    advance: int = 0  # items (prompts, steps) finished since the task's last event
    tokens: int = 0  # tokens generated or trained since the last event
    total: int | None = None  # items in the task, when known
    done: int | None = None  # items already done when the task (re)started
    metrics: dict | None = None  # the newest metrics row (training steps, validation passes)
    message: str | None = None  # a line to show


Progress = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The progress callback of a caller that does not watch."""


def emitter(progress: Progress | None) -> Progress:
    return progress or ignore
