"""`edgeloop demo`'s progress when its output is a log or a pipe: plain lines, not a live table
that rich would only print at the end."""

from __future__ import annotations

from edgeloop.demo_cli import PlainProgress, bar, progress_line


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_stages_always_print_and_progress_lines_are_throttled_and_bar_free():
    lines, clock = [], Clock()
    plain = PlainProgress(lines.append, every=10, clock=clock)
    plain("stage", {"stage": "seed_model", "detail": "profile fast"})
    for epoch in range(1, 4):
        plain("seed_epoch", {"epoch": epoch, "epochs": 30})
        clock.now += 4
    clock.now += 10
    plain("seed_epoch", {"epoch": 4, "epochs": 30})
    plain("seed_epoch", {"epoch": 4, "epochs": 30})  # unchanged: not again
    plain("stage_done", {"stage": "seed_model", "seconds": 321.04})
    assert lines == ["stage seed_model: profile fast", "  training seed epoch 1/30", "  training seed epoch 4/30",
                     "stage seed_model done in 321.0 s"]
    assert "█" not in "".join(lines) and "░" not in "".join(lines)


def test_a_new_stage_prints_its_first_progress_line_at_once():
    lines, clock = [], Clock()
    plain = PlainProgress(lines.append, every=10, clock=clock)
    plain("samples", {"pending": 10, "threshold": 250, "by_status": {"validated": 10}})
    plain("stage", {"stage": "retrain", "detail": "job #1"})
    plain("job", {"id": 1, "status": "running", "stage": "train", "progress": {"epoch": 1, "epochs": 5}})
    assert lines[-1] == "  job #1 running · train epoch 1/5"


def test_the_live_table_and_the_plain_lines_say_the_same():
    info = {"items": [{"id": "cam-1", "active_version": 2, "update_state": "ACTIVE"},
                      {"id": "cam-2", "active_version": 1, "update_state": "SHADOWING"}], "version": 2}
    assert progress_line("devices", info, bar).startswith("switched " + "█" * 15 + "░" * 15 + " 1/2")
    assert progress_line("devices", info, lambda d, t: "") == "switched  1/2  cam-1:ACTIVE, cam-2:SHADOWING"
    assert progress_line("stage", {}, bar) is None
