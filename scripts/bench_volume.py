#!/usr/bin/env python
"""Benchmark of the VRN target pipeline on the dense 38,365-vertex / 76,073-triangle BFM mean face.

Per pose: voxelize_face time (median over runs, one thread), to_bytes size, decode time
(numpy), decode_torch time (CPU), marching-cubes time (volume_to_mesh).

    VRN_ASSETS_DIR=/work/shared/assets python scripts/bench_volume.py [--runs 30]
"""

from __future__ import annotations

import argparse
import os

# one thread everywhere (set before numpy / torch load their thread pools)
for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_k, "1")

import platform  # noqa: E402

import numpy as np  # noqa: E402

from vrn.bench_timing import cpu_model, median_ms  # noqa: E402


def bfm_mean_face(width_px: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    """BFM no-neck mean face -> frontal crop px (x right, y down, z to camera), ~width_px wide."""
    from vrn import assets

    z = np.load(assets.resolve("3ddfa_v2/bfm_noneck_v3_offline.npz"))
    u = z["u"].reshape(-1, 3).astype(np.float64)  # interleaved x, y, z; y up
    tri = z["tri"]
    tri = tri.T if tri.shape[0] == 3 else tri  # (3, F) 0-based in the offline file
    s = width_px / np.ptp(u[:, 0])
    v = (u - u.mean(0)) * np.array([s, -s, s])
    return v, np.ascontiguousarray(tri[:, ::-1], dtype=np.int32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--mc-runs", type=int, default=3)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from vrn.geometry.transforms import euler_to_matrix
    from vrn.volume import voxelize as vox_mod
    from vrn.volume.codec import decode, decode_torch, to_bytes
    from vrn.volume.mesh import volume_to_mesh
    from vrn.volume.voxelize import voxelize_face

    cpu = cpu_model()
    print(
        f"machine: {platform.platform()} | {cpu} | "
        f"cpu_count={os.cpu_count()} | python {platform.python_version()} | numpy {np.__version__} | "
        f"torch {torch.__version__} (1 thread)"
    )
    v0, tris = bfm_mean_face()
    print(f"mesh: BFM mean, {len(v0)} vertices, {len(tris)} triangles, ~{np.ptp(v0[:, 0]):.0f} px wide")
    print("voxelize: median; 'cold' = without the boundary-edge cache (a new topology every call)")
    print(
        f"{'pose (yaw,pitch,roll)':>22} | {'voxelize ms':>11} | {'cold ms':>7} | {'bytes':>6} | {'x smaller':>9} | "
        f"{'extra runs':>10} | {'decode ms':>9} | {'decode_torch ms':>15} | {'marching cubes ms':>17}"
    )
    for ypr in [(0, 0, 0), (30, 10, 5), (-60, -20, 10), (90, 0, 0)]:
        R = euler_to_matrix(*ypr)
        p = v0 @ R.T
        p[:, :2] += 96.0
        p[:, 2] += 50.0 - (p[:, 2].min() + p[:, 2].max()) / 2
        posed = p.astype(np.float32)
        t_vox, code = median_ms(lambda: voxelize_face(posed, tris, R), args.runs)

        def cold() -> object:
            vox_mod._EDGE_CACHE.clear()
            return voxelize_face(posed, tris, R)

        t_cold, _ = median_ms(cold, args.runs)
        blob = to_bytes(code)
        t_dec, vol = median_ms(lambda: decode(code), max(3, args.runs // 3))
        lo, hi = torch.from_numpy(code.lo[None]), torch.from_numpy(code.hi[None])
        ex = [torch.from_numpy(code.extra.astype(np.int64))]
        t_dt, _ = median_ms(lambda: decode_torch(lo, hi, ex, code.depth_bins), max(3, args.runs // 3))
        t_mc, _ = median_ms(lambda: volume_to_mesh(vol), args.mc_runs)
        print(
            f"{str(ypr):>22} | {t_vox:11.2f} | {t_cold:7.2f} | {len(blob):6d} | {vol.size / len(blob):9.0f} | "
            f"{len(code.extra):10d} | {t_dec:9.2f} | {t_dt:15.2f} | {t_mc:17.1f}"
        )


if __name__ == "__main__":
    main()
