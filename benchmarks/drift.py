"""Drift monitoring: how fast a shift is caught, how often noise raises an alarm, what it costs live.

    .venv/bin/python benchmarks/drift.py [--windows 1000] [--json PATH]

One process, the cached ``fast`` seed model (trained on first use), its drift reference computed
as the server computes it for a registered seed (``training.drift_reference`` over the seed's base
training data, Ultralytics predict at the device's thresholds), and real device statistics: every
frame is rendered by ``training.synth``, run through the agent's ONNX Runtime detector and measured
by ``edge_agent.drift_stats`` -- the device's own code.

1. **False alarms** (``false_alarms_per_1000_windows``): device windows of ``--window`` frames on the
   unshifted ``base`` line, judged one after another by the server's policy
   (``server.drift.policy.evaluate`` with the default ``DriftPolicy``). Windows are drawn with
   replacement from a pool of ``--pool`` fresh base frames (never the reference's images), so 1,000
   windows cost a few thousand inferences instead of half a million; a ``--qa-share`` of the frames
   carries the line QA's verdict (its labels against the detections, as the agent judges them);
   each drift or performance-decay signal raised counts as one false alarm.
2. **Detection** (``detection_windows``): per shifted scenario, ``--warmup`` base windows, then
   windows of the shift until the policy raises drift; the figure is the number of shifted windows
   it took (median and worst of ``--repeats`` runs).
3. **Live-path cost** (``fps_cost``): the agent's frame loop (``infer``) at full speed with
   ``DriftWindow.add`` + ``due`` + ``report`` per frame; each frame times its inference and its drift
   calls back to back, cost = t_drift / (t_infer + t_drift) = 1 - fps(with) / fps(without). Alternating
   blocks without/with drift are timed too, as a cross-check (noisier on a shared machine).

Every figure is printed beside a named baseline measured in the same run: for (1) and (2) the same
thresholds without hysteresis ("single-window threshold": raise on the first window over, clear on
the first under), for (3) the live loop without drift statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_agent.drift import DriftSettings, DriftWindow  # noqa: E402
from edge_agent.drift_stats import STATS_VERSION, StatsAccumulator, image_stats  # noqa: E402
from server.drift.policy import Component, SubjectState, Window, evaluate  # noqa: E402
from server.drift.reference import components_of  # noqa: E402
from server.settings import DriftPolicy  # noqa: E402
from training.drift_reference import DriftReference, compute_reference, images_of_data_yaml, spread  # noqa: E402
from training.synth import SCENARIOS, render_frame  # noqa: E402

HYSTERESIS_BASELINE = "single-window threshold (no hysteresis)"
FPS_BASELINE = "live loop without drift statistics"
#: (image statistics, classes, confidences, QA verdict: None when QA did not judge the frame)
FrameRecord = tuple[tuple[float, ...], list[int], list[float], bool | None]


def seed_reference(cache: Path, limit: int) -> tuple[object, DriftReference, float]:
    from training.seed_model import ensure_seed_model

    seed = ensure_seed_model(cache, "fast", config_dir=cache / "ultralytics")
    path = cache / "bench" / f"drift-reference-{seed.key}-s{STATS_VERSION}-n{limit}.json"
    if path.is_file():
        return seed, DriftReference.from_json(path.read_bytes()), 0.0
    from training.drift_reference import ultralytics_detector

    t0 = time.monotonic()
    predict = ultralytics_detector(seed.pt, seed.imgsz, config_dir=cache / "ultralytics")
    images = spread(images_of_data_yaml(seed.data_yaml, ["train", "val"]), limit)
    reference = compute_reference({"base": images}, predict, 3, source={"benchmark": "seed base data"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(reference.to_json())
    return seed, reference, time.monotonic() - t0


def record_pool(detector, scenario: str, n: int, seed: int, imgsz: int, qa_share: float) -> list[FrameRecord]:
    """Frames as the agent sees them: detections, statistics, and the line QA's verdict on a share."""
    from edge_agent.collector import labels_to_detections
    from edge_agent.matching import frame_is_correct
    from training.synth_source import labelled

    pool = []
    for i in range(n):
        image, labels = render_frame(scenario, seed, i, imgsz)
        dets = list(detector.infer(image).detections)
        verdict = None
        if labelled(scenario, seed, i, qa_share):
            verdict = not frame_is_correct(dets, labels_to_detections(labels, image.shape[1], image.shape[0]))
        pool.append((image_stats(image), [d.cls for d in dets], [d.conf for d in dets], verdict))
    return pool


def window_of(pool: list[FrameRecord], rng: np.random.Generator, size: int, num_classes: int,
              image_every: int = DriftSettings().image_every) -> Window:
    """A device window as the agent builds it (image statistics on every ``image_every``-th frame)."""
    acc = StatsAccumulator(num_classes)
    qa = corrected = 0
    for n, i in enumerate(rng.integers(0, len(pool), size)):
        stats_, classes, confs, verdict = pool[i]
        if n % image_every == 0:
            acc.add_image_stats(stats_)
        acc.add_detections(classes, confs)
        if verdict is not None:
            qa, corrected = qa + 1, corrected + verdict
    return Window(frames=acc.frames, histograms=acc.histograms(), correction_rate=corrected / qa if qa else None,
                  qa_frames=qa)


def false_alarms(pool, components, policy: DriftPolicy, windows: int, size: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    state = SubjectState()
    drift = decay = raised = 0
    peak: dict[str, list[float]] = {}
    for _ in range(windows):
        verdict = evaluate(state, window_of(pool, rng, size, 3), 1, components, policy)
        drift += verdict.drift_event == "raised"
        decay += verdict.decay_event == "raised"
        raised += verdict.drifting or verdict.decayed  # a raised signal that never clears is one alarm, many windows
        for name, value in verdict.values.items():
            peak.setdefault(name, []).append(value)
    noise = {name: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)), "max": float(max(v)),
                    "threshold": policy.threshold_for(name).raise_above} for name, v in sorted(peak.items())}
    return {"windows": windows, "drift_alarms": drift, "decay_alarms": decay, "windows_raised": raised,
            "per_1000_windows": 1000.0 * (drift + decay) / windows, "statistic_noise": noise}


def detection(base_pool, shift_pool, components, policy: DriftPolicy, size: int, warmup: int, repeats: int,
              limit: int) -> dict:
    drift_runs, decay_runs, metrics = [], [], {}
    for r in range(repeats):
        rng = np.random.default_rng(1000 + r)
        state = SubjectState()
        for _ in range(warmup):
            evaluate(state, window_of(base_pool, rng, size, 3), 1, components, policy)
        drift_at = decay_at = None
        for k in range(1, limit + 1):
            verdict = evaluate(state, window_of(shift_pool, rng, size, 3), 1, components, policy)
            # The first shifted window the subject is flagged in (already flagged by a false alarm
            # in the warm-up counts as caught at once).
            if drift_at is None and verdict.drifting:
                drift_at = k
                metrics = {m: round(verdict.values[m], 3) for m in verdict.drifting_metrics if m in verdict.values}
            if decay_at is None and verdict.decayed:
                decay_at = k
            if drift_at is not None and decay_at is not None:
                break
        drift_runs.append(drift_at)
        decay_runs.append(decay_at)

    def summary(runs):
        hit = [r for r in runs if r is not None]
        return {"median": statistics.median(hit) if hit else None, "worst": max(hit) if len(hit) == len(runs) else None,
                "missed": len(runs) - len(hit), "runs": runs}

    return {"drift": summary(drift_runs), "decay": summary(decay_runs), "metrics_raised_first_run": metrics}


def fps_cost(detector, frames: list[np.ndarray], rounds: int, settings: DriftSettings) -> dict:
    """The drift path's share of the live loop, two ways.

    In-loop (the figure): every frame of the with-drift loop times its ``infer`` and its drift calls
    (``add`` + ``due`` + ``report`` when due) back to back, so both see the same instant's load;
    fps with / fps without = t_infer / (t_infer + t_drift). A/B (the cross-check): alternating
    blocks of the loop without and with drift; it also sees cache effects, but on a shared machine
    its noise (a few %) is larger than what it measures.
    """
    window = DriftWindow(settings, num_classes=3)
    reports = 0
    spent = {"infer": 0.0, "drift": 0.0}

    def plain(frame):
        detector.infer(frame)

    def with_drift(frame):
        nonlocal reports
        t0 = time.perf_counter()
        result = detector.infer(frame)
        t1 = time.perf_counter()
        window.add(frame, result.detections, None)
        if window.due():
            window.report("bench-device", 1)
            reports += 1
        t2 = time.perf_counter()
        spent["infer"] += t1 - t0
        spent["drift"] += t2 - t1

    for frame in frames[:20]:
        with_drift(frame)
    spent = {"infer": 0.0, "drift": 0.0}
    seconds = {"plain": 0.0, "drift": 0.0}
    counted = {"plain": 0, "drift": 0}
    for r in range(rounds):
        order = [("plain", plain), ("drift", with_drift)] if r % 2 == 0 else [("drift", with_drift), ("plain", plain)]
        for name, fn in order:
            t0 = time.perf_counter()
            for frame in frames:
                fn(frame)
            seconds[name] += time.perf_counter() - t0
            counted[name] += len(frames)
    fps = {k: counted[k] / seconds[k] for k in seconds}
    in_loop = spent["drift"] / (spent["infer"] + spent["drift"])
    return {"fps_cost": in_loop, "fps_ratio": 1.0 - in_loop,
            "infer_ms_per_frame": 1000 * spent["infer"] / counted["drift"],
            "drift_us_per_frame": 1e6 * spent["drift"] / counted["drift"],
            "ab_fps_baseline": fps["plain"], "ab_fps_with_drift": fps["drift"],
            "ab_fps_cost": 1.0 - fps["drift"] / fps["plain"],
            "reports": reports, "frames_per_variant": counted["plain"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=1000, help="unshifted windows judged for false alarms")
    parser.add_argument("--window", type=int, default=DriftSettings().window_frames, help="frames per window")
    parser.add_argument("--small-windows", type=int, nargs="*", default=[250, 100],
                        help="also judge windows of these sizes (false alarms, detection)")
    parser.add_argument("--pool", type=int, default=3000, help="fresh base frames windows are drawn from")
    parser.add_argument("--shift-pool", type=int, default=800, help="frames per shifted scenario")
    parser.add_argument("--warmup", type=int, default=5, help="base windows before each shift")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-windows", type=int, default=30, help="give up on a shift after this many")
    parser.add_argument("--reference-images", type=int, default=1000)
    parser.add_argument("--qa-share", type=float, default=0.2, help="share of frames the line's QA judges")
    parser.add_argument("--fps-frames", type=int, default=100, help="frames per timed block")
    parser.add_argument("--fps-rounds", type=int, default=20, help="pairs of blocks (without, with)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from edge_agent.inference import create_detector
    from edgeloop.paths import cache_dir

    cache = cache_dir()
    t_start = time.monotonic()
    seed, reference, ref_seconds = seed_reference(cache, args.reference_images)
    components: dict[str, Component] = components_of(reference)
    detector = create_detector(seed.onnx, {"type": "onnxruntime", "intra_op_threads": 1})
    detector.load()
    policy = DriftPolicy()
    baseline = policy.model_copy(update={"raise_after": 1, "clear_after": 1})

    t0 = time.monotonic()
    base_pool = record_pool(detector, "base", args.pool, 101, seed.imgsz, args.qa_share)
    shifts = [s for s in SCENARIOS if s != "base"]
    shift_pools = {s: record_pool(detector, s, args.shift_pool, 101, seed.imgsz, args.qa_share) for s in shifts}
    qa_rates = {name: float(np.mean([r[3] for r in pool if r[3] is not None]))
                for name, pool in (("base", base_pool), *shift_pools.items())}
    pool_seconds = time.monotonic() - t0

    alarms = {name: false_alarms(base_pool, components, p, args.windows, args.window, 7)
              for name, p in (("policy", policy), ("baseline", baseline))}
    detect = {name: {s: detection(base_pool, shift_pools[s], components, p, args.window, args.warmup, args.repeats,
                                  args.max_windows) for s in shifts}
              for name, p in (("policy", policy), ("baseline", baseline))}
    frames = [render_frame("base", 202, i, seed.imgsz)[0] for i in range(args.fps_frames)]
    fps = fps_cost(detector, frames, args.fps_rounds, DriftSettings(window_frames=args.window))
    # Smaller windows: noisier histograms -- where the hysteresis earns its delay.
    small = {}
    for size in args.small_windows:
        small[size] = {name: {
            **{k: v for k, v in false_alarms(base_pool, components, p, args.windows, size, 8).items()
               if k in {"per_1000_windows", "windows_raised"}},
            "detection_windows": {s: detection(base_pool, shift_pools[s], components, p, size, args.warmup,
                                               args.repeats, args.max_windows)["drift"]["worst"] for s in shifts}}
            for name, p in (("policy", policy), ("baseline", baseline))}

    def ratio(a, b):
        return None if a is None or b in (None, 0) else a / b

    out = {
        "detection_windows": {s: detect["policy"][s]["drift"]["worst"] for s in shifts},
        "false_alarms_per_1000_windows": alarms["policy"]["per_1000_windows"],
        "fps_cost": fps["fps_cost"],
        "baselines": {"hysteresis": HYSTERESIS_BASELINE, "fps": FPS_BASELINE},
        "ratios": {
            "detection_windows_vs_baseline": {s: ratio(detect["policy"][s]["drift"]["worst"],
                                                       detect["baseline"][s]["drift"]["worst"]) for s in shifts},
            "false_alarms_vs_baseline": ratio(alarms["policy"]["per_1000_windows"],
                                              alarms["baseline"]["per_1000_windows"]),
            "fps_vs_baseline": fps["fps_ratio"],
        },
        "detection": detect,
        "smaller_windows": small,
        "false_alarms": alarms,
        "fps": fps,
        "config": {"window_frames": args.window, "windows": args.windows, "pool": args.pool,
                   "shift_pool": args.shift_pool, "warmup": args.warmup, "repeats": args.repeats,
                   "reference_frames": reference.frames, "reference_seconds": round(ref_seconds, 1),
                   "pool_seconds": round(pool_seconds, 1), "policy": policy.model_dump(mode="json"),
                   "qa_share": args.qa_share, "correction_rate_by_scenario": qa_rates,
                   "seed_model": seed.key, "stats_version": STATS_VERSION},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "seconds": round(time.monotonic() - t_start, 1),
    }

    print(f"reference: {reference.frames} base images ({ref_seconds:.0f} s to compute; 0 = cached); "
          f"windows of {args.window} frames; pools {args.pool} base + {args.shift_pool} per shift")
    print("QA correction rate of the seed model (share of judged frames corrected): "
          + ", ".join(f"{k} {v:.0%}" for k, v in qa_rates.items()))
    print(f"\nfalse alarms on base, per 1,000 windows ({args.windows} judged):")
    for name in ("policy", "baseline"):
        a = alarms[name]
        label = "policy (hysteresis)" if name == "policy" else HYSTERESIS_BASELINE
        print(f"  {label:45s} {a['per_1000_windows']:7.1f}  (drift {a['drift_alarms']}, decay {a['decay_alarms']}; "
              f"{a['windows_raised']} windows spent raised)")
    print(f"\nwindows from the shift to the drift alert (median / worst of {args.repeats}; decay alert):")
    for s in shifts:
        p, b = detect["policy"][s], detect["baseline"][s]
        print(f"  {s:16s} policy {p['drift']['median']} / {p['drift']['worst']}"
              f"  (decay {p['decay']['median']})   {HYSTERESIS_BASELINE}: {b['drift']['median']} / {b['drift']['worst']}"
              f"   ratio {out['ratios']['detection_windows_vs_baseline'][s]}")
    for size, figures in small.items():
        p, b = figures["policy"], figures["baseline"]
        print(f"\nwindows of {size} frames: false alarms per 1,000 windows {p['per_1000_windows']:.1f}, "
              f"{p['windows_raised']} windows raised (baseline {b['per_1000_windows']:.1f}, "
              f"{b['windows_raised']} raised); windows to detect (worst) "
              + ", ".join(f"{s} {p['detection_windows'][s]} (baseline {b['detection_windows'][s]})" for s in shifts))
    print(f"\nlive path: drift calls {fps['drift_us_per_frame']:.0f} us/frame beside {fps['infer_ms_per_frame']:.2f} ms "
          f"of inference -> fps ratio {fps['fps_ratio']:.4f} vs {FPS_BASELINE}, fps_cost {fps['fps_cost']:.2%}; "
          f"A/B blocks: {fps['ab_fps_with_drift']:.1f} vs {fps['ab_fps_baseline']:.1f} fps "
          f"({fps['ab_fps_cost']:+.2%}, noisier)")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {out['seconds']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
