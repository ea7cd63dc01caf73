"""Edge inference latency: the agent's ONNX Runtime pipeline (letterbox → session → decode →
NMS) against the baseline of Ultralytics' own PyTorch ``predict`` on the same weights and frames.

    python benchmarks/inference.py [--frames 200] [--threads 1] [--json PATH]

Uses the cached fast seed model (trained on first use, a few minutes) and synthetic frames of
the default shift. Prints p50/p99 per frame and the speed-up as a ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def _percentiles(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples)
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            "mean_ms": float(arr.mean())}


def _time(fn, frames, warmup: int = 5) -> list[float]:
    for frame in frames[:warmup]:
        fn(frame)
    out = []
    for frame in frames:
        t0 = time.perf_counter()
        fn(frame)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for both runtimes")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    from edgeloop.paths import cache_dir
    from training import synth
    from training.seed_model import ensure_seed_model
    from training.ultralytics_env import offline_ultralytics

    cache = cache_dir()
    offline_ultralytics(cache / "ultralytics", threads=args.threads)
    seed = ensure_seed_model(cache, "fast", config_dir=cache / "ultralytics")
    frames = [synth.render_frame(synth.DEFAULT_SHIFT, 4242, i, seed.imgsz)[0] for i in range(args.frames)]

    import torch
    from ultralytics import YOLO

    from edge_agent.inference import create_detector

    torch.set_num_threads(args.threads)
    baseline_model = YOLO(str(seed.pt))
    baseline = _time(lambda f: baseline_model.predict(f, imgsz=seed.imgsz, conf=0.25, verbose=False), frames)

    detector = create_detector(seed.onnx, {"type": "onnxruntime", "intra_op_threads": args.threads})
    detector.load()
    candidate = _time(detector.infer, frames)

    result = {
        "benchmark": "inference",
        "baseline": "ultralytics_pt_predict",
        "frames": args.frames,
        "threads": args.threads,
        "imgsz": seed.imgsz,
        "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "ultralytics_pt_predict": _percentiles(baseline),
        "edge_agent_onnxruntime": _percentiles(candidate),
    }
    result["speedup_p50"] = result["ultralytics_pt_predict"]["p50_ms"] / result["edge_agent_onnxruntime"]["p50_ms"]
    b, c = result["ultralytics_pt_predict"], result["edge_agent_onnxruntime"]
    print(f"{'pipeline':<34}{'p50 ms':>9}{'p99 ms':>9}")
    print(f"{'ultralytics .pt predict (baseline)':<34}{b['p50_ms']:>9.2f}{b['p99_ms']:>9.2f}")
    print(f"{'edge_agent onnxruntime':<34}{c['p50_ms']:>9.2f}{c['p99_ms']:>9.2f}")
    print(f"speed-up at p50: {result['speedup_p50']:.2f}x the baseline "
          f"({args.frames} frames, {args.threads} thread(s), imgsz {seed.imgsz})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
