"""The retrain job's stages and their state on the job row (``TrainingJob.result["pipeline"]``).

Every stage is idempotent: run again it gives the same outputs, and until the last one it
changes nothing that another job could see (the data gate's quarantine and contract
decisions are about the samples themselves, not about this job). ``commit`` is the one
point after which the job's samples are consumed and its version is registered, in one
database transaction that also marks the job finished. So a job found ``running`` has
consumed nothing, and a server that restarts can pick it up at its first stage not done.

The state, next to the job's other results::

    {"attempt": 2, "stages": {"validate": {"status": "done", "output": {...}, "seconds": 1.2},
                              "train": {"status": "running", "process": {"pid": 4242, ...}}, ...}}

This module is the light half (the scheduler reads it at startup); the stages' work is in
:mod:`server.pipeline.runner`.
"""

from __future__ import annotations

from dataclasses import dataclass

#: How many times one job may start (its first run included) before a restart fails it.
MAX_ATTEMPTS = 3

DONE, RUNNING, FAILED, SKIPPED = "done", "running", "failed", "skipped"


@dataclass(frozen=True)
class StageInfo:
    name: str
    does: str
    #: Whether a finished output survives a restart (its files are checked before reuse).
    resumable: bool = True


#: In order. ``bundle`` and ``register`` are skipped for a candidate the gate rejected.
STAGES: tuple[StageInfo, ...] = (
    StageInfo("validate", "quarantine poisoning devices, apply the data contract to the pending samples"),
    StageInfo("snapshot", "freeze the pending samples into a content-addressed manifest (consumes nothing)"),
    StageInfo("dataset", "materialise the manifest and the replay set in the job's folder"),
    StageInfo("train", "fine-tune, evaluate, export and build engines on the executor"),
    StageInfo("gate", "candidate against production on every eval set"),
    StageInfo("bundle", "reserve a version number, build and sign the bundle"),
    StageInfo("register", "upload weights, ONNX and bundle under the reserved version"),
    StageInfo("commit", "one transaction: consume the samples, record the snapshot, register the version",
              resumable=False),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def pipeline_state(result: dict | None) -> dict:
    state = (result or {}).get("pipeline") or {}
    return {"attempt": int(state.get("attempt", 0)), "stages": dict(state.get("stages") or {})}


def done_stages(result: dict | None) -> list[str]:
    stages = pipeline_state(result)["stages"]
    return [name for name in STAGE_NAMES if stages.get(name, {}).get("status") in {DONE, SKIPPED}]


def resume_decision(result: dict | None) -> tuple[bool, str]:
    """Whether a job a restart found ``running`` is picked up again, and why (or why not)."""
    state = pipeline_state(result)
    done = done_stages(result)
    if not done:
        return False, "nothing of it was kept to resume from"
    if state["attempt"] >= MAX_ATTEMPTS:
        return False, f"it already started {state['attempt']} times (limit {MAX_ATTEMPTS})"
    following = [n for n in STAGE_NAMES if n not in done]
    return True, f"resuming at {following[0] if following else 'commit'} (done: {', '.join(done)})"
