"""Evaluation speed: our Frechet distance against the scipy.linalg.sqrtm computation, and I3D throughput.

Frechet distance: both from the same covariances of random features (2 x D samples a set), at D = 400 (I3D, FVD)
and 2,048 (Inception, FID); best of `--rounds`, the two methods interleaved. I3D: feature extraction of
`--clips` uint8 clips of 16 frames at 256x256 (resized to 224) in one call, random weights, on the CPU; best of
`--rounds` after a warm-up clip. The last line printed is one JSON object with the figures; `ratio` = sqrtm time /
our time at D = 2,048 (the speed-up).

BLAS runs on OPENBLAS_NUM_THREADS threads, 1 unless set: on an oversubscribed CPU, OpenBLAS's spinning threads
make LAPACK 10-100x slower and both timings noise.

    python benchmarks/eval_metrics.py [--rounds 3] [--clips 4] [--dims 400 2048]
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads OpenBLAS

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
import torch  # noqa: E402

from eval.fvd import frechet_distance_gaussians  # noqa: E402
from eval.i3d import I3DConfig, I3DFeatureExtractor, InceptionI3d  # noqa: E402


def sqrtm_frechet(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """The original FVD/FID code's computation."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    diff = mu_a - mu_b
    return float(np.real(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean)))


def best_time(fn, rounds: int) -> tuple[float, float]:
    """(best seconds, result) of `rounds` calls."""
    best, result = float("inf"), None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_frechet(dim: int, rounds: int) -> dict[str, float]:
    rng = np.random.default_rng(dim)
    mix = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    a = rng.standard_normal((2 * dim, dim)) @ mix
    b = rng.standard_normal((2 * dim, dim)) @ mix.T + 0.1
    stats = (a.mean(axis=0), np.cov(a, rowvar=False), b.mean(axis=0), np.cov(b, rowvar=False))
    ours_s = sqrtm_s = float("inf")
    for _ in range(rounds):  # interleaved, so drift in machine load hits both alike
        t, ours = best_time(lambda: frechet_distance_gaussians(*stats), 1)
        ours_s = min(ours_s, t)
        t, reference = best_time(lambda: sqrtm_frechet(*stats), 1)
        sqrtm_s = min(sqrtm_s, t)
    return {"ours_s": round(ours_s, 4), "sqrtm_s": round(sqrtm_s, 4), "speedup": round(sqrtm_s / ours_s, 2),
            "distance": ours, "rel_diff": abs(ours - reference) / abs(reference)}


def bench_i3d(clips: int, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "rgb_imagenet.pt"
        torch.save(InceptionI3d().state_dict(), weights)
        extractor = I3DFeatureExtractor(I3DConfig(weights=str(weights), batch_size=clips))
    videos = np.random.default_rng(0).integers(0, 256, size=(clips, 16, 256, 256, 3), dtype=np.uint8)
    extractor(videos[:1])
    seconds, features = best_time(lambda: extractor(videos), rounds)
    assert features.shape == (clips, 400)
    return {"clips": clips, "seconds": round(seconds, 3), "clips_per_s": round(clips / seconds, 3),
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--dims", type=int, nargs="+", default=[400, 2048])
    args = parser.parse_args(argv)

    frechet = {}
    for dim in args.dims:
        frechet[dim] = bench_frechet(dim, args.rounds)
        f = frechet[dim]
        print(f"Frechet D={dim:5d}: ours {f['ours_s']:.4f} s, sqrtm {f['sqrtm_s']:.4f} s, speed-up "
              f"{f['speedup']:.1f}x, relative difference {f['rel_diff']:.1e}")
    i3d = bench_i3d(args.clips, args.rounds)
    print(f"I3D features: {i3d['clips']} clips of 16x224x224 in {i3d['seconds']:.2f} s = {i3d['clips_per_s']:.2f} "
          f"clips/s (CPU, {i3d['torch_threads']} threads, random weights)")
    print(json.dumps({
        "benchmark": "eval", "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "blas_threads": os.environ["OPENBLAS_NUM_THREADS"],
        "rounds": args.rounds, "frechet": {str(dim): f for dim, f in frechet.items()}, "i3d": i3d,
        "ratio": frechet[max(frechet)]["speedup"],
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
