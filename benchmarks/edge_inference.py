"""Edge inference on CPU: Ultralytics' own runtimes against the agent's, and what each step buys.

    .venv/bin/python benchmarks/edge_inference.py [--frames 200] [--threads 1 2] [--json PATH]

Same weights (the cached ``fast`` seed model, trained on first use), same frames (synthetic
``base`` line, ``--frame-size`` px, letterboxed to the model's 160 px), one process:

  (a) Ultralytics ``predict`` on the ``.pt`` (the baseline every ratio is against),
  (b) Ultralytics ``predict`` on its own ONNX export,
  (c) the agent's runtime: ``create_detector(...).infer(frame)`` -- letterbox, model, decode, NMS --
      in each configuration: ONNX Runtime at each graph-optimization level, ONNX Runtime on the
      INT8 model from ``training.quantize`` (gated on the golden set in this run), and the
      OpenVINO backend on the fp32 model (f32 and bf16) and on the INT8 model.

Every agent configuration is also scored on the golden set through the agent's own pipeline
(conf 0.001, mAP50-95 by Ultralytics' ``ap_per_class``), and (c) is the fastest configuration
at 1 thread whose golden mAP50-95 is within the quantization tolerance of ONNX Runtime fp32.

Timings interleave the configurations in rounds, so load from other processes falls on all of
them alike; the load average is printed and recorded. A second part runs the agent's live path
(``infer`` + ``ShadowRunner.offer``) at full speed with shadow mode off and on, in alternating
blocks, and reports the fps drop.

``--json PATH`` writes every figure, including ``speedup_vs_ultralytics_pt`` (p50 of (a) / p50
of (c), 1 thread) and ``shadow_fps_drop`` (a fraction).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

BASELINE = "ultralytics-pt"
CPU = ["CPUExecutionProvider"]


@dataclass
class Variant:
    key: str
    label: str
    threads: int
    make: Callable[[], Callable[[np.ndarray], Any]]
    agent: bool = False
    note: str = ""
    samples: list[float] = field(default_factory=list)
    run: Callable[[np.ndarray], Any] | None = None

    def stats(self) -> dict[str, float]:
        arr = np.asarray(self.samples)
        mean = float(arr.mean())
        return {
            "p50_ms": float(np.percentile(arr, 50)),
            "p99_ms": float(np.percentile(arr, 99)),
            "mean_ms": mean,
            "fps": 1000.0 / mean,
            "n": int(arr.size),
        }


def _time_block(fn: Callable[[np.ndarray], Any], frames: list[np.ndarray], warmup: int) -> list[float]:
    for frame in frames[:warmup]:
        fn(frame)
    out = []
    for frame in frames:
        t0 = time.perf_counter()
        fn(frame)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


# --- golden-set accuracy through the agent's pipeline -------------------------------------------


def _match(gt_cls: np.ndarray, gt_boxes: np.ndarray, det_cls: np.ndarray, det_boxes: np.ndarray,
           iouv: np.ndarray) -> np.ndarray:
    """Ultralytics' ``match_predictions``: a prediction is a TP at threshold t when it is the
    best-IoU unmatched same-class partner of a label."""
    from edge_agent.matching import iou_matrix

    correct = np.zeros((len(det_cls), len(iouv)), bool)
    if not len(gt_cls) or not len(det_cls):
        return correct
    iou = iou_matrix(gt_boxes, det_boxes) * (gt_cls[:, None] == det_cls[None, :])
    for i, t in enumerate(iouv):
        gi, pi = np.nonzero(iou >= t)
        if not gi.size:
            continue
        m = np.stack([gi, pi, iou[gi, pi]], 1)
        m = m[m[:, 2].argsort()[::-1]]
        m = m[np.unique(m[:, 1], return_index=True)[1]]
        m = m[np.unique(m[:, 0], return_index=True)[1]]
        correct[m[:, 1].astype(int), i] = True
    return correct


def golden_map(detector: Any, images: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, float]:
    """mAP50 / mAP50-95 of a loaded detector (built with conf 0.001) on ``(image, cls, xyxy)`` items."""
    from ultralytics.utils.metrics import ap_per_class

    from edge_agent.inference import detections_to_arrays

    iouv = np.linspace(0.5, 0.95, 10)
    tps, confs, pcls, tcls = [], [], [], []
    for image, gt_cls, gt_boxes in images:
        boxes, conf, cls = detections_to_arrays(detector.infer(image).detections)
        tps.append(_match(gt_cls, gt_boxes, cls, boxes, iouv))
        confs.append(conf)
        pcls.append(cls)
        tcls.append(gt_cls)
    ap = ap_per_class(np.concatenate(tps), np.concatenate(confs), np.concatenate(pcls), np.concatenate(tcls))[5]
    return {"map50": float(ap[:, 0].mean()), "map50_95": float(ap.mean())}


def load_golden(golden: Any) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    from training import synth

    items = []
    for img_path in sorted(golden.images_dir.glob("*.jpg")):
        image = cv2.imread(str(img_path), cv2.IMREAD_COLOR)
        h, w = image.shape[:2]
        label_path = golden.root / "labels" / "val" / f"{img_path.stem}.txt"
        labels = synth.parse_labels(label_path.read_text())
        cls = np.array([lb[0] for lb in labels], np.int64)
        xywh = np.array([lb[1:] for lb in labels], np.float64).reshape(-1, 4) * [w, h, w, h]
        xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
        items.append((image, cls, xyxy))
    return items


# --- pre-processing before this issue, for its share of the gain --------------------------------


def preprocess_reference(frame: np.ndarray, imgsz: tuple[int, int]) -> np.ndarray:
    """The agent's tensor conversion before the LUT change: flip/transpose, astype, divide."""
    from edge_agent.inference.preprocess import letterbox, to_bgr

    img, _ = letterbox(to_bgr(frame), imgsz)
    chw = np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1))
    tensor = chw[None].astype(np.float32)
    tensor /= 255.0
    return tensor


# --- main ---------------------------------------------------------------------------------------


def _agent_variants(threads: int, fp32: Path, int8: Path) -> list[tuple[str, str, Path, dict[str, Any]]]:
    ort = {"type": "onnxruntime", "providers": CPU, "intra_op_threads": threads}
    ov = {"type": "openvino", "num_threads": threads}
    return [
        ("ort-fp32-disable", "agent ORT fp32, graph opt off", fp32, {**ort, "graph_optimization": "disable"}),
        ("ort-fp32-basic", "agent ORT fp32, opt basic", fp32, {**ort, "graph_optimization": "basic"}),
        ("ort-fp32-extended", "agent ORT fp32, opt extended", fp32, {**ort, "graph_optimization": "extended"}),
        ("ort-fp32", "agent ORT fp32, opt all", fp32, {**ort, "graph_optimization": "all"}),
        ("ort-int8", "agent ORT INT8, opt all", int8, {**ort, "graph_optimization": "all"}),
        ("ov-fp32", "agent OpenVINO fp32 (f32)", fp32, {**ov, "inference_precision": "f32"}),
        ("ov-bf16", "agent OpenVINO fp32 model, bf16", fp32, {**ov, "inference_precision": "bf16"}),
        ("ov-int8", "agent OpenVINO INT8", int8, {**ov, "inference_precision": "f32"}),
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200, help="timed frames per configuration and thread count")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--frame-size", type=int, default=256, help="side of the square camera frames")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the frames are split into")
    parser.add_argument("--shadow-seconds", type=float, default=16.0,
                        help="timed live-path seconds per shadow run, half with shadow on")
    parser.add_argument("--shadow-budget", action="append", default=None, metavar="SPEC",
                        help="ShadowBudget for the shadow run: 'default' or e.g. 'share=0.5,max_busy_fraction=0.3'; "
                             "repeat for several runs (the first gives shadow_fps_drop)")
    parser.add_argument("--agent", help="force (c) to this configuration key (e.g. ort-int8) instead of the rule")
    parser.add_argument("--skip-openvino", action="store_true")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    load_before = os.getloadavg()

    from edgeloop.paths import cache_dir
    from training import synth
    from training.golden import ensure_golden_set
    from training.quantize import QuantizeConfig, quantize_and_gate
    from training.seed_model import ensure_base_dataset, ensure_seed_model
    from training.ultralytics_env import offline_ultralytics

    cache = cache_dir()
    offline_ultralytics(cache / "ultralytics", threads=1)
    seed = ensure_seed_model(cache, "fast", config_dir=cache / "ultralytics")
    golden = ensure_golden_set(cache, 7, 200, seed.imgsz)
    frames = [synth.render_frame("base", 4242, i, args.frame_size)[0] for i in range(args.frames)]

    import torch
    from ultralytics import YOLO

    from edge_agent.inference import create_detector
    from edge_agent.inference.postprocess import postprocess
    from edge_agent.inference.preprocess import preprocess

    # INT8: quantize the seed's ONNX on its own training images and gate it on the golden set.
    qcfg = QuantizeConfig()
    bench_dir = cache / "bench"
    int8_path = bench_dir / f"seed-{seed.profile}-{seed.key}-int8.onnx"
    calib = ensure_base_dataset(cache, seed.profile).parent / "images" / "train"
    print(f"quantizing {seed.onnx.name} (INT8 QDQ, {qcfg.calibration_images} calibration images) ...", flush=True)
    qm, gate = quantize_and_gate(seed.onnx, int8_path, [calib], golden.data_yaml, qcfg,
                                 config_dir=cache / "ultralytics")

    has_ov = not args.skip_openvino
    if has_ov:
        try:
            import openvino  # noqa: F401
        except ImportError:
            print("openvino is not installed: skipping the OpenVINO configurations")
            has_ov = False

    variants: list[Variant] = []
    for t in args.threads:
        def ul(path: Path, t: int = t) -> Callable[[], Callable[[np.ndarray], Any]]:
            def make() -> Callable[[np.ndarray], Any]:
                model = YOLO(str(path), task="detect")

                def run(frame: np.ndarray) -> Any:
                    torch.set_num_threads(t)
                    return model.predict(frame, imgsz=seed.imgsz, conf=0.25, verbose=False)

                return run
            return make

        variants.append(Variant(BASELINE, "(a) ultralytics .pt predict", t, ul(seed.pt)))
        variants.append(Variant("ultralytics-onnx", "(b) ultralytics ONNX predict", t, ul(seed.onnx),
                                note="its ONNX session ignores the thread setting (ORT default threads)"))
        for key, label, path, settings in _agent_variants(t, seed.onnx, int8_path):
            if key.startswith("ov-") and not has_ov:
                continue

            def make(path: Path = path, settings: dict = settings) -> Callable[[np.ndarray], Any]:
                det = create_detector(path, settings)
                det.load()
                return det.infer

            variants.append(Variant(key, label, t, make, agent=True))

    print(f"timing {len(variants)} configurations x {args.frames} frames of {args.frame_size} px "
          f"in {args.rounds} interleaved rounds (load average {load_before[0]:.2f}) ...", flush=True)
    for v in variants:
        v.run = v.make()
    chunk = max(1, args.frames // args.rounds)
    for r in range(args.rounds):
        block = frames[r * chunk:(r + 1) * chunk] if r < args.rounds - 1 else frames[r * chunk:]
        for v in variants:
            v.samples += _time_block(v.run, block, warmup=5)
    for v in variants:
        v.run = None
    gc.collect()

    # Golden-set accuracy through the agent's pipeline, once per configuration (1 thread).
    golden_items = load_golden(golden)
    accuracy: dict[str, dict[str, float]] = {}
    for key, _label, path, settings in _agent_variants(1, seed.onnx, int8_path):
        if key.startswith("ov-") and not has_ov:
            continue
        det = create_detector(path, {**settings, "conf": 0.001})
        det.load()
        accuracy[key] = golden_map(det, golden_items)
        det.close()

    # Pre-processing: the conversion before and after this change, and the pipeline split of (c).
    imgsz = (seed.imgsz, seed.imgsz)
    pre_old = _time_block(lambda f: preprocess_reference(f, imgsz), frames, warmup=5)
    pre_new = _time_block(lambda f: preprocess(f, imgsz), frames, warmup=5)

    by = {(v.key, v.threads): v.stats() for v in variants}
    one = min(args.threads)
    base = by[(BASELINE, one)]
    ref_map = accuracy["ort-fp32"]["map50_95"]
    eligible = [k for k, a in accuracy.items() if ref_map - a["map50_95"] <= qcfg.max_map_loss]
    agent_key = args.agent or min(eligible, key=lambda k: by[(k, one)]["p50_ms"])
    if agent_key not in accuracy:
        raise SystemExit(f"--agent {agent_key!r} is not one of {sorted(accuracy)}")

    # Split of (c)'s time: letterbox + tensor, model, decode + NMS.
    chosen = next(s for k, _l, p, s in _agent_variants(one, seed.onnx, int8_path) if k == agent_key)
    chosen_path = next(p for k, _l, p, _s in _agent_variants(one, seed.onnx, int8_path) if k == agent_key)
    det = create_detector(chosen_path, chosen)
    det.load()
    split: dict[str, list[float]] = {"pre": [], "model": [], "post": []}
    for frame in frames:
        t0 = time.perf_counter()
        tensor, lb = preprocess(frame, det.imgsz, dtype=det._input_dtype)
        t1 = time.perf_counter()
        raw = det._forward(tensor)
        t2 = time.perf_counter()
        postprocess(raw, lb, nc=len(det.class_names))
        t3 = time.perf_counter()
        split["pre"].append((t1 - t0) * 1e3)
        split["model"].append((t2 - t1) * 1e3)
        split["post"].append((t3 - t2) * 1e3)

    shadow_runs = [
        _shadow_run(det, lambda: _fresh(chosen_path, chosen), frames, args.shadow_seconds, _budget(spec))
        for spec in (args.shadow_budget or ["default"])
    ]
    shadow = shadow_runs[0]
    det.close()
    load_after = os.getloadavg()

    result: dict[str, Any] = {
        "benchmark": "edge_inference",
        "baseline": BASELINE,
        "frames": args.frames,
        "frame_size": args.frame_size,
        "imgsz": seed.imgsz,
        "threads": args.threads,
        "rounds": args.rounds,
        "machine": {
            "processor": _cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
        },
        "versions": _versions(),
        "configurations": {
            f"{v.key}@{v.threads}": {"key": v.key, "label": v.label, "threads": v.threads, **v.stats(),
                                     "speedup_p50": base["p50_ms"] / v.stats()["p50_ms"] if v.threads == one
                                     else by[(BASELINE, v.threads)]["p50_ms"] / v.stats()["p50_ms"],
                                     "note": v.note}
            for v in variants
        },
        "golden_agent_pipeline": accuracy,
        "quantization": {
            "path": str(int8_path),
            "config": qcfg.model_dump(),
            "excluded_nodes": len(qm.excluded_nodes),
            "seconds": round(qm.seconds, 1),
            "gate": gate.to_dict(),
        },
        "agent_runtime": agent_key,
        "agent_runtime_rule": "chosen with --agent" if args.agent else (
            "fastest agent configuration at 1 thread whose golden mAP50-95 (agent pipeline) is within "
            "max_map_loss of ONNX Runtime fp32"),
        "speedup_vs_ultralytics_pt": base["p50_ms"] / by[(agent_key, one)]["p50_ms"],
        "speedup_vs_ultralytics_pt_by_threads": {
            str(t): by[(BASELINE, t)]["p50_ms"] / by[(agent_key, t)]["p50_ms"] for t in args.threads
        },
        "contributions_p50": _contributions(by, one, has_ov),
        "preprocess_us": {
            "before_p50": float(np.percentile(pre_old, 50)) * 1e3,
            "after_p50": float(np.percentile(pre_new, 50)) * 1e3,
        },
        "agent_split_ms_p50": {k: float(np.percentile(v, 50)) for k, v in split.items()},
        "shadow": shadow,
        "shadow_runs": shadow_runs,
        "shadow_fps_drop": shadow["fps_drop"],
        "seconds": round(time.monotonic() - started, 1),
    }
    _print(result, variants, one)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _budget(spec: str) -> dict[str, float]:
    """'default' -> {}; 'share=0.5,max_busy_fraction=0.3' -> those ShadowBudget fields."""
    if spec.strip() == "default":
        return {}
    out = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        out[key.strip()] = float(value)
    return out


def _fresh(path: Path, settings: dict) -> Any:
    from edge_agent.inference import create_detector

    det = create_detector(path, settings)
    det.load()
    return det


def _shadow_run(active: Any, make_candidate: Callable[[], Any], frames: list[np.ndarray],
                seconds: float, budget: dict[str, float], blocks: int = 2) -> dict[str, Any]:
    """The agent's live path at full speed: ``infer`` then ``ShadowRunner.offer``, as in
    ``Agent.run``, in alternating off/on blocks of ``seconds / (2 * blocks)`` timed seconds;
    fps = frames done per wall second.

    A budget with a busy-fraction cap starts each on-block with one untimed ``window_s`` of
    shadow work, so the timed part sees the steady state and not the burst a fresh sliding window
    allows; the backlog left at the end of an on-block is worked off (``wait_idle``) before the
    next block starts.
    """
    from edge_agent.shadow import ShadowBudget, ShadowItem, ShadowRunner

    shadow_budget = ShadowBudget(**budget)
    warm_s = shadow_budget.window_s if shadow_budget.max_busy_fraction < 1.0 else 0.0
    block_s = seconds / (2 * blocks)
    done = {"off": [0, 0.0], "on": [0, 0.0]}
    reports = []
    offered = [0]
    candidate = make_candidate()

    def live(runner: Any, duration: float, start: int) -> int:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < duration:
            frame = frames[(start + n) % len(frames)]
            result = active.infer(frame)
            if runner is not None:
                runner.offer(ShadowItem(frame, list(result.detections), result.latency_ms, None))
            n += 1
        return n

    try:
        for _ in range(blocks):
            for mode in ("off", "on"):
                runner = None
                if mode == "on":
                    runner = ShadowRunner(candidate, window_frames=10**9, budget=shadow_budget)
                    offered[0] += live(runner, warm_s, 0)
                t0 = time.perf_counter()
                n = live(runner, block_s, 0)
                elapsed = time.perf_counter() - t0
                if runner is not None:
                    offered[0] += n
                    runner.wait_idle(timeout=30)
                    reports.append(runner.report())
                    runner.close()
                done[mode][0] += n
                done[mode][1] += elapsed
    finally:
        candidate.close()
    fps_off = done["off"][0] / done["off"][1]
    fps_on = done["on"][0] / done["on"][1]
    compared = sum(r.get("frames_compared", 0) for r in reports)
    dropped = sum(r.get("frames_dropped", 0) for r in reports)
    skipped = sum(r.get("frames_skipped_budget", 0) for r in reports)
    return {
        "fps_off": fps_off,
        "fps_on": fps_on,
        "fps_drop": (fps_off - fps_on) / fps_off,
        "live_frames_on": done["on"][0],
        "shadow_frames_compared": compared,
        "shadow_frames_dropped": dropped,
        "shadow_frames_skipped_budget": skipped,
        "shadow_share": compared / offered[0] if offered[0] else 0.0,
        "seconds_timed": seconds,
        "warm_seconds_per_on_block": warm_s,
        "shadow_budget": shadow_budget.model_dump(),
        "shadow_queue": "ShadowRunner default",
    }


def _contributions(by: dict, t: int, has_ov: bool) -> dict[str, float]:
    """Speed-up ratios (p50) of one step over the one before it, at ``t`` threads."""
    p = {k: v["p50_ms"] for (k, tt), v in by.items() if tt == t}
    out = {
        "ultralytics_onnx_vs_pt": p[BASELINE] / p["ultralytics-onnx"],
        "agent_ort_fp32_opt_off_vs_pt": p[BASELINE] / p["ort-fp32-disable"],
        "graph_opt_basic_vs_off": p["ort-fp32-disable"] / p["ort-fp32-basic"],
        "graph_opt_extended_vs_basic": p["ort-fp32-basic"] / p["ort-fp32-extended"],
        "graph_opt_all_vs_extended": p["ort-fp32-extended"] / p["ort-fp32"],
        "graph_opt_all_vs_basic": p["ort-fp32-basic"] / p["ort-fp32"],
        "int8_vs_fp32_ort": p["ort-fp32"] / p["ort-int8"],
    }
    if has_ov:
        out |= {
            "openvino_f32_vs_ort_fp32": p["ort-fp32"] / p["ov-fp32"],
            "openvino_bf16_vs_f32": p["ov-fp32"] / p["ov-bf16"],
            "openvino_int8_vs_f32": p["ov-fp32"] / p["ov-int8"],
            "openvino_int8_vs_ort_int8": p["ort-int8"] / p["ov-int8"],
        }
    return out


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("onnxruntime", "openvino", "ultralytics", "torch", "opencv-python-headless", "numpy"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def _print(r: dict, variants: list[Variant], one: int) -> None:
    acc = r["golden_agent_pipeline"]
    print()
    print(f"{'configuration':<36}{'thr':>4}{'p50 ms':>9}{'p99 ms':>9}{'fps':>8}{'vs (a)':>8}{'mAP50-95':>10}")
    for v in variants:
        c = r["configurations"][f"{v.key}@{v.threads}"]
        m = acc.get(v.key, {}).get("map50_95")
        mark = " <- (c)" if v.key == r["agent_runtime"] else ""
        print(f"{v.label:<36}{v.threads:>4}{c['p50_ms']:>9.2f}{c['p99_ms']:>9.2f}{c['fps']:>8.0f}"
              f"{c['speedup_p50']:>7.2f}x{(f'{m:.3f}' if m is not None else '-'):>10}{mark}")
    g = r["quantization"]["gate"]
    print(f"\nINT8 gate (Ultralytics validator, golden set): fp32 mAP50-95 {g['fp32']['map50_95']:.4f}, "
          f"INT8 {g['int8']['map50_95']:.4f}, loss {g['map50_95_loss']:+.4f} (tolerance {g['tolerance']})")
    print("\ncontributions (p50 ratios, 1 thread):")
    for k, v in r["contributions_p50"].items():
        print(f"  {k:<34}{v:6.2f}x")
    pre = r["preprocess_us"]
    split = r["agent_split_ms_p50"]
    print(f"  {'preprocess (us, before -> after)':<34}{pre['before_p50']:6.0f} -> {pre['after_p50']:.0f}")
    print(f"  (c) split p50 ms: pre {split['pre']:.3f}, model {split['model']:.3f}, post {split['post']:.3f}")
    print()
    for s in r["shadow_runs"]:
        print(f"live path, shadow off {s['fps_off']:.0f} fps, on {s['fps_on']:.0f} fps: drop {s['fps_drop']:.1%} "
              f"(shadow compared {s['shadow_share']:.0%} of live frames, queue drops {s['shadow_frames_dropped']}, "
              f"over budget {s['shadow_frames_skipped_budget']}; budget {s['shadow_budget']})")
    print(f"\n(c) = {r['agent_runtime']}: {r['speedup_vs_ultralytics_pt']:.2f}x Ultralytics .pt predict at p50, "
          f"{one} thread; {r['frames']} frames of {r['frame_size']} px, imgsz {r['imgsz']}; load average "
          f"{r['machine']['load_average_before'][0]} -> {r['machine']['load_average_after'][0]}; "
          f"{r['seconds']:.0f} s")


if __name__ == "__main__":
    main()
