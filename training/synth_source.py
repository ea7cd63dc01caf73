"""The synthetic generator as a frame-source plugin for the edge agent.

Registered under the entry-point group ``edgeloop.frame_sources`` as ``synthetic`` (see
pyproject.toml), so an agent opens ``synthetic:line_b?seed=1&labels=0.2`` without importing this
package. The plugin contract is plain data: ``(frame_id, image_bgr, labels_or_None)`` tuples.

Parameters (all optional):

* ``seed`` (int, 0) -- with the scenario and index, fixes every pixel and label.
* ``imgsz`` (int, 160) -- frame size in pixels.
* ``start`` (int, 0) -- first frame index.
* ``count`` (int) -- frames per pass; without it the stream is endless. With ``count``, a looping
  source starts over at ``start``, a non-looping one ends.
* ``labels`` (float in [0, 1], 1) -- share of frames that carry their ground truth, which the agent
  treats as the line's QA correction (1 = every frame, 0 = none). Which frames carry labels is a
  pure function of (scenario, seed, index), like the pixels.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterator, Mapping

import numpy as np

from training.synth import Label, get_scenario, render_frame

_PARAMS = {"seed", "imgsz", "start", "count", "labels"}


def _int(params: Mapping[str, str], key: str, default: int | None, minimum: int) -> int | None:
    raw = params.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{key} must be at least {minimum}, got {value}")
    return value


def labelled(scenario: str, seed: int, index: int, rate: float) -> bool:
    """Whether frame ``index`` carries its labels, for a label share ``rate``."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    draw = zlib.crc32(f"labels:{scenario}:{seed}:{index}".encode()) / 2**32
    return draw < rate


def synthetic_source(
    target: str, params: Mapping[str, str], *, loop: bool = True
) -> Iterator[tuple[str, np.ndarray, list[Label] | None]]:
    """Frames of scenario ``target`` (default ``base``); raises ValueError on a bad spec, before any frame."""
    scenario = target or "base"
    try:
        get_scenario(scenario)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    unknown = sorted(set(params) - _PARAMS)
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(_PARAMS))}")
    seed = _int(params, "seed", 0, 0)
    imgsz = _int(params, "imgsz", 160, 32)
    start = _int(params, "start", 0, 0)
    count = _int(params, "count", None, 1)
    try:
        rate = float(params.get("labels", "1"))
    except ValueError:
        raise ValueError(f"labels={params['labels']!r} is not a number in [0, 1]") from None
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"labels must be in [0, 1], got {rate}")
    return _frames(scenario, seed, imgsz, start, count, rate, loop)


def _frames(scenario: str, seed: int, imgsz: int, start: int, count: int | None, rate: float,
            loop: bool) -> Iterator[tuple[str, np.ndarray, list[Label] | None]]:
    while True:
        indices = itertools.count(start) if count is None else range(start, start + count)
        for index in indices:
            image, labels = render_frame(scenario, seed, index, imgsz)
            yield (f"{scenario}-{seed}-{index:07d}", image,
                   labels if labelled(scenario, seed, index, rate) else None)
        if not loop:
            return
