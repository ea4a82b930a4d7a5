"""Adapter weights that change over the denoising steps: `<lora:name:W@S-E>`, `<lora:name:W~W2>`.

The weight text of an adapter tag (or of `--schedule NAME=SPEC`) is

    W            the weight W at every step (a plain weight; no schedule)
    W@S-E        W during the steps from fraction S to fraction E of the run, 0 outside
                 (A1111 extensions' form): `1@0.5-1` applies the adapter to the late half only
    W~W2         a ramp: W at the first step, W2 at the last, linear in between
    W~W2@S-E     the ramp over the steps from S to E, 0 outside

S and E are fractions of the steps, 0 <= S < E <= 1. Step i of n sits at fraction i / n, and
belongs to the window when S <= i / n < E: with 20 steps, `@0.5-1` is steps 10-19 and `@0-0.5`
steps 0-9, so two windows that meet at 0.5 share no step and leave none out. A ramp goes from W
at the window's first step to W2 at its last one.

The schedule moves the UNet's weight only: the text encoder runs once, before the first step,
and takes the first weight W. A schedule applies to every denoising pass: the hires fix's
second pass runs it again over its own steps, and img2img over the steps it runs.

Records keep W as the adapter's weight and the rest of the text (`@0.5-1`, `~1@0.2-1`) as its
schedule (`format_schedule`), so a picture's settings say exactly what a tag said.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sdlora.errors import SdloraError

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)"
WEIGHT_TEXT = re.compile(
    rf"\s*(?P<weight>{_NUMBER})\s*(?:~\s*(?P<to>{_NUMBER})\s*)?"
    rf"(?:@\s*(?P<start>{_NUMBER})\s*-\s*(?P<end>{_NUMBER})\s*)?"
)


@dataclass(frozen=True)
class WeightSchedule:
    """What happens to an adapter's weight W over the steps (see the module docstring)."""

    start: float = 0.0
    end: float = 1.0
    to: float | None = None  # the ramp's last weight; None: W throughout the window

    def weight(self, first: float, step: int, steps: int) -> float:
        """The UNet weight at step `step` (0-based) of `steps`, the tag's first weight being
        `first`. Step 0 never depends on `steps` (it is in the window only when S is 0, and is
        then the window's first step), which lets a pass set it before it knows its length."""
        window = [i for i in range(steps) if self.start <= i / steps < self.end]
        if step not in window:
            return 0.0
        if self.to is None or len(window) == 1:
            return first
        progress = (step - window[0]) / (window[-1] - window[0])
        return first + (self.to - first) * progress


def parse_weight_text(text: str, where: str) -> tuple[float, WeightSchedule | None]:
    """"1@0.5-1" -> (1.0, WeightSchedule(0.5, 1.0)); a plain number -> (weight, None)."""
    match = WEIGHT_TEXT.fullmatch(text)
    if match is None:
        raise SdloraError(
            f"{where}: weight {text.strip()!r} is not W, W@START-END, W~W2 or W~W2@START-END "
            "(START and END fractions of the steps)"
        )
    weight = _finite(match["weight"], where)
    if match["to"] is None and match["start"] is None:
        return weight, None
    to = None if match["to"] is None else _finite(match["to"], where)
    start = 0.0 if match["start"] is None else _finite(match["start"], where)
    end = 1.0 if match["end"] is None else _finite(match["end"], where)
    if not 0 <= start < end <= 1:
        raise SdloraError(
            f"{where}: in weight {text.strip()!r}, the steps {start:g}-{end:g} are not "
            "START-END with 0 <= START < END <= 1"
        )
    return weight, WeightSchedule(start, end, to)


def parse_schedule(text: str, where: str) -> WeightSchedule:
    """A recorded schedule ("@0.5-1", "~1@0.2-1"; see `format_schedule`) read back."""
    _, schedule = parse_weight_text(f"1{text}", where)
    if schedule is None:
        raise SdloraError(f"{where}: {text!r} is not a weight schedule like @0.5-1 or ~1")
    return schedule


def format_schedule(schedule: WeightSchedule) -> str:
    """The weight text after its first number: "~0.2", "@0.5-1", "~1@0.2-0.8"."""
    ramp = "" if schedule.to is None else f"~{schedule.to:g}"
    if (schedule.start, schedule.end) == (0.0, 1.0) and ramp:
        return ramp
    return f"{ramp}@{schedule.start:g}-{schedule.end:g}"


def _finite(text: str, where: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise SdloraError(f"{where}: weight {text!r} is not a finite number")
    return value


def schedule_hook(
    mixer, weights: Mapping[str, float], schedules: Mapping[str, str]
) -> Callable[[int, int], None] | None:
    """A step hook (`hook(step, steps)`, run before each denoising step) that gives the
    adapters of `schedules` (name -> recorded schedule, "@0.5-1") their UNet weight for that
    step, from their weight in `weights`; None when none of `weights` is scheduled. Adapters
    without a schedule get their UNet back at their weight (a previous image may have left a
    step weight)."""
    parsed = {
        name: parse_schedule(text, f"schedule of {name!r}")
        for name, text in schedules.items()
        if name in weights
    }
    mixer.set_step_weights(dict.fromkeys(set(mixer.weights) - set(parsed)))
    if not parsed:
        return None

    def before_step(step: int, steps: int) -> None:
        mixer.set_step_weights({
            name: schedule.weight(weights[name], step, steps) for name, schedule in parsed.items()
        })

    return before_step
