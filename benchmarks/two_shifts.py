"""Does the second retrain still hold the first shift? Two successive shifts, history on vs off.

    python benchmarks/two_shifts.py [--shift1 line_b] [--shift2 low_light] [--samples 400]
                                    [--epochs 5] [--json PATH]

Real parts: a SeaweedFS S3 gateway started here, a SQLite registry, the server's retrain runner
and its local subprocess executor running Ultralytics (train, evaluate, export, quantize).

1. The cached ``fast`` seed model (trained on ``base``) is production.
2. ``--samples`` labeled images of ``--shift1`` arrive as validated samples; one full retrain job
   runs (snapshot S1) and its model M1 becomes production.
3. ``--samples`` images of ``--shift2`` arrive. The second retrain (snapshot S2, parent S1) is run
   twice from the same production model M1 and the same snapshot: with the cumulative training
   set (``history_max_images`` at its default, so S1's samples are selected by
   ``server.pipeline.snapshot.select_history``) and, as the baseline in the same run, with
   history off (``history_max_images=0``: new samples plus base replay, as before). Both arms
   run the runner's own stages validate → snapshot → dataset → train → gate and stop before
   bundle/commit, so neither consumes the samples the other trains on.

Every model is evaluated by the executor on fixed evaluation sets disjoint from the samples:
200 frames of each shift (``training.golden.ensure_eval_set``) and the golden set (``base``).
The gate is loosened (golden tolerance and recall drop 1.0) so that M1 becomes production
whatever its golden score: this measures forgetting, not the gate; the gate's verdict on each
arm under that policy is reported. Figures are mAP50 (mAP50-95 in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SAMPLE_SEED = 5151  # rendered samples; the eval sets use seed 7 at index 80,000,000+: disjoint
SETS = ("shift1", "shift2", "golden")


def _add_samples(ctx, scenario: str, count: int, imgsz: int, devices: int = 2) -> None:
    from benchmarks.pipeline import seed_samples

    seed_samples(ctx, count, imgsz, devices, scenario=scenario, seed=SAMPLE_SEED, device_prefix=f"{scenario}-")


def _new_job(ctx, reason: str) -> int:
    from server.db.models import TrainingJob

    with ctx.sessions() as session:
        job = TrainingJob(trigger="manual", reason=reason)
        session.add(job)
        session.commit()
        return job.id


def _up_to_gate(runner, settings, job_id: int):
    """The runner's stages validate → snapshot → dataset → train → gate, nothing committed."""
    from server.pipeline.runner import _Job

    work = settings.data_dir / "jobs" / f"{job_id:06d}"
    work.mkdir(parents=True, exist_ok=True)
    job = _Job(job_id, work, 1)
    for stage in runner.stages:
        job.outputs[stage.name] = stage.run(job)
        if stage.name == "gate":
            return job
    raise AssertionError("no gate stage")


def _figures(metrics: dict) -> dict:
    return {name: {"map50": round(m["map50"], 4), "map50_95": round(m["map50_95"], 4)}
            for name, m in metrics.items() if name in {*SETS, "new_data", "history"}}


def run(shift1: str, shift2: str, samples: int, epochs: int, keep: bool) -> dict:
    from edgeloop.paths import cache_dir
    from server.app import build_context
    from server.db.models import TrainingJob
    from server.pipeline.executor import LocalSubprocessExecutor
    from server.pipeline.runner import RetrainRunner
    from server.settings import ServerSettings, TrainingPolicy
    from server.stack.seaweedfs import SeaweedS3
    from training import golden, seed_model

    cache = cache_dir()
    work = Path(tempfile.mkdtemp(prefix="edgeloop-bench-two-shifts-"))
    os.chmod(work, 0o755)
    started = time.monotonic()
    seed = seed_model.ensure_seed_model(cache, "fast", config_dir=cache / "ultralytics")
    profile = seed_model.profile_of("fast")
    golden_set = golden.ensure_golden_set(cache, profile.golden_seed, profile.golden_n, profile.imgsz)
    evals = {name: golden.ensure_eval_set(cache, scenario, imgsz=seed.imgsz).data_yaml
             for name, scenario in (("shift1", shift1), ("shift2", shift2))}
    s3 = SeaweedS3(work / "s3")
    s3.start()
    try:
        policy = TrainingPolicy(imgsz=seed.imgsz, epochs=epochs, golden_tolerance=1.0, max_recall_drop=1.0,
                                approval="auto")
        settings = ServerSettings(
            data_dir=work / "server", s3_endpoint=s3.endpoint, s3_access_key=s3.access_key,
            s3_secret_key=s3.secret_key, s3_bucket="bench", eval_sets={"golden": golden_set.data_yaml, **evals},
            replay_data=seed.data_yaml, training=policy, auto_deploy=False,
        )
        ctx = build_context(settings, connect_mqtt=False)
        register_dir = work / "register"
        register_dir.mkdir()
        ctx.publisher.register_external(pt=seed.pt, onnx=seed.onnx, imgsz=seed.imgsz, metrics={},
                                        hyperparameters=seed.hyperparameters, actor="benchmark", source="",
                                        work_dir=register_dir)
        executor = LocalSubprocessExecutor(timeout_seconds=6 * 3600)

        # Shift 1: one full job, whose model becomes production.
        _add_samples(ctx, shift1, samples, seed.imgsz)
        job1_id = _new_job(ctx, f"two_shifts: {shift1}")
        t0 = time.monotonic()
        RetrainRunner(settings, ctx.sessions, ctx.store, executor, ctx.publisher).run(job1_id)
        job1_seconds = time.monotonic() - t0
        with ctx.sessions() as session:
            job1 = session.get(TrainingJob, job1_id)
            if job1.status != "succeeded":
                raise SystemExit(f"the shift-1 job did not become production ({job1.status}):\n{job1.log}")
            metrics1 = job1.result["metrics"]
            s1 = job1.snapshot_id

        # Shift 2: the same job twice from M1 and snapshot S2, history on and off.
        _add_samples(ctx, shift2, samples, seed.imgsz)
        arms = {}
        for arm, cap in (("history_on", policy.history_max_images), ("history_off", 0)):
            arm_settings = settings.model_copy(update={
                "training": policy.model_copy(update={"history_max_images": cap})})
            job_id = _new_job(ctx, f"two_shifts: {shift2}, {arm}")
            t0 = time.monotonic()
            job = _up_to_gate(RetrainRunner(arm_settings, ctx.sessions, ctx.store, executor, ctx.publisher),
                              arm_settings, job_id)
            result = job.outputs["train"]["result"]
            data = job.outputs["dataset"]
            arms[arm] = {
                "history_max_images": cap, "seconds": round(time.monotonic() - t0, 1),
                "snapshot": job.outputs["snapshot"]["id"], "parent": job.outputs["snapshot"]["parent_id"],
                "dataset": {k: data[k] for k in ("train_images", "history_images", "history_val_images",
                                                 "replay_images", "val_images")},
                "history": data["history"], "metrics": _figures(result["metrics"]["candidate"]),
                "production_metrics": _figures(result["metrics"]["production"]),
                "gate_passed": job.outputs["gate"]["passed"], "gate_reasons": job.outputs["gate"]["reasons"],
            }
        ctx.engine.dispose()
    finally:
        s3.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    assert arms["history_on"]["parent"] == s1 and arms["history_on"]["snapshot"] == arms["history_off"]["snapshot"]
    models = {
        "seed": _figures(metrics1["production"]),
        "after_shift1": _figures(metrics1["candidate"]),
        "after_shift2_history_on": arms["history_on"]["metrics"],
        "after_shift2_history_off": arms["history_off"]["metrics"],
    }
    on, off, m1 = (models[k]["shift1"]["map50"] for k in
                   ("after_shift2_history_on", "after_shift2_history_off", "after_shift1"))
    return {
        "shift1": shift1, "shift2": shift2, "samples_per_shift": samples, "epochs": epochs,
        "history_max_images": policy.history_max_images, "replay_ratio": policy.replay_ratio,
        "models": models,
        "shift1_map50_kept": {"history_on": round(on - m1, 4), "history_off": round(off - m1, 4)},
        "job1_seconds": round(job1_seconds, 1), "arms": arms,
        "wall_seconds": round(time.monotonic() - started, 1),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "load_average": os.getloadavg()},
        "work_dir": str(work) if keep else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shift1", default="line_b", help="scenario of the first shift (default line_b)")
    parser.add_argument("--shift2", default="low_light", help="scenario of the second shift (default low_light)")
    parser.add_argument("--samples", type=int, default=400, help="new labeled images per shift (default 400)")
    parser.add_argument("--epochs", type=int, default=5, help="fine-tune epochs per job (default 5)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (job logs, datasets)")
    args = parser.parse_args(argv)
    report = run(args.shift1, args.shift2, args.samples, args.epochs, args.keep)
    print(f"{args.samples} samples per shift, {args.epochs} epochs; shift 1 = {args.shift1}, "
          f"shift 2 = {args.shift2}; mAP50 on fixed 200-frame eval sets")
    header = f"| model | {args.shift1} (shift 1) | {args.shift2} (shift 2) | golden |"
    print(header)
    print("|---|---|---|---|")
    for name, figures in report["models"].items():
        print(f"| {name} | " + " | ".join(f"{figures[s]['map50']:.3f}" for s in SETS) + " |")
    for arm in ("history_on", "history_off"):
        d = report["arms"][arm]["dataset"]
        print(f"{arm}: {d['train_images']} new train + {d['history_images']} history + {d['replay_images']} "
              f"replayed, {report['arms'][arm]['seconds']} s, gate passed: {report['arms'][arm]['gate_passed']}")
    print(f"shift-1 mAP50 change from the shift-1 model: {report['shift1_map50_kept']}")
    print(f"wall {report['wall_seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
