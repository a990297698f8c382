"""Foundation benchmark: voxelisation per sample, packed bytes per sample, and one training
step of vrn_unguided at batch 1 on this machine's CPU.

    python scripts/bench.py [--steps 3] [--samples 20]

Results go to docs/benchmarks.md by hand (with the machine line this prints).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from vrn.bench_timing import median_ms

os.environ.setdefault("VRN_ASSETS_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "assets"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--samples", type=int, default=20)
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )

    from vrn.data.packed import PackedReader
    from vrn.data.synthetic import SyntheticFaceConfig, generate_packed, render_sample
    from vrn.face_models.sfm import load_sfm
    from vrn.volume.voxelize import voxelize_face

    # Voxelisation of the synthetic SFM faces (3448 vertices) at random poses.
    cfg, model = SyntheticFaceConfig(), load_sfm()
    rng = np.random.default_rng(0)
    ms, _ = median_ms(lambda: render_sample(cfg, rng, model), a.samples, warmup=0)
    print(f"synthetic sample (render + voxelise), median over {a.samples}: {ms:.1f} ms")

    # The same voxeliser alone on a posed SFM face.
    from vrn.geometry.transforms import euler_to_matrix

    R = euler_to_matrix(40.0, 10.0, 5.0).astype(np.float32)
    v = model.mean * np.array([0.58, -0.58, 0.58], dtype=np.float32)
    v = (v - v.mean(0)) @ R.T + np.array([95.5, 95.5, 50.0], dtype=np.float32)
    ms, _ = median_ms(lambda: voxelize_face(v.astype(np.float32), model.tris, R), 30)
    print(f"voxelise SFM face (3448 verts, 6736 tris), median: {ms:.2f} ms")

    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "packed"
        generate_packed(root, cfg, {"train": a.samples, "val": 0, "test": 0}, seed=0, progress=False)
        reader = PackedReader(root)
        idx = reader.index
        print(
            f"packed bytes per sample: {reader.bytes_per_sample() / 1024:.1f} KiB "
            f"(image {idx[:, 1].mean() / 1024:.1f} KiB PNG + target {idx[:, 3].mean() / 1024:.1f} KiB) "
            f"vs 7,372,800 B uint8 volume"
        )
        ms, _ = median_ms(lambda: reader[0], 20)
        print(f"read + decode one packed sample: {ms:.2f} ms")

    # One training step of the full model at batch 1.
    from vrn.losses import volume_bce_loss
    from vrn.models import create_model

    net = create_model("vrn_unguided")
    opt = torch.optim.RMSprop(net.parameters(), lr=1e-4)
    x = torch.rand(1, 3, 192, 192)
    target = (torch.rand(1, 200, 192, 192) > 0.5).float()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = volume_bce_loss(net(x), target)
        loss.backward()
        opt.step()

    ms, _ = median_ms(step, a.steps)
    print(f"vrn_unguided training step, batch 1, CPU: {ms:.0f} ms (median of {a.steps})")
    net.eval()
    with torch.no_grad():
        ms, _ = median_ms(lambda: net(x), a.steps)
    print(f"vrn_unguided forward, batch 1, CPU: {ms:.0f} ms")


if __name__ == "__main__":
    main()
