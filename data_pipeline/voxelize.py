"""Stage 3, voxelize: fitted mesh + head rotation -> the VRN target volume.

``python -m data_pipeline.voxelize input_dir=<out>/fit output_dir=<out>/voxelize``

:func:`vrn.volume.voxelize.voxelize_face`: the face surface filled back to a plane behind
the face in the face's own (frontal) frame, then posed -- a solid, not a shell; x/y in crop
px, depth bin ``d = depth_factor * z`` (2), ``depth_bins`` (200) bins. The mesh is the
no-neck BFM of the fit stage (no neck, no ears). Written per sample as
``items/<id>.vol`` = :func:`vrn.volume.codec.to_bytes` (the compact run-length code).

Each sample also records what ``reap`` judges: ``occupied_columns`` (pixels with any
voxel), ``voxels``, ``clip_back`` / ``clip_front`` (fractions of occupied columns whose
solid touches depth bin 0 / the last bin, i.e. was cut by the volume) and
``outside_fraction`` (fraction of mesh vertices outside the crop's x/y range).
"""

from __future__ import annotations

from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from data_pipeline.fit import load_fit_mesh
from data_pipeline.run import run_single_stage
from data_pipeline.stage import Item, ItemContext, ItemFailure, Stage
from vrn.conventions import CROP_SIZE, DEPTH_BINS, DEPTH_FACTOR
from vrn.volume.codec import VolumeCode, to_bytes
from vrn.volume.voxelize import voxelize_face

__all__ = ["VoxelizeStage", "volume_stats"]


def volume_stats(code: VolumeCode) -> dict[str, Any]:
    """Occupancy and clipping numbers of a code (see the module doc)."""
    D = int(code.depth_bins)
    first = code.hi > code.lo
    occ = first.copy()
    top_hi = np.where(first, code.hi.astype(np.int64), 0)
    if len(code.extra):
        ex = code.extra.astype(np.int64)
        flat_occ = occ.reshape(-1)
        flat_occ[ex[:, 0]] = True
        flat_top = top_hi.reshape(-1)
        np.maximum.at(flat_top, ex[:, 0], ex[:, 2])
    n = int(occ.sum())
    back = int((first & (code.lo == 0)).sum())
    front = int((occ & (top_hi >= D)).sum())
    return {
        "occupied_columns": n,
        "voxels": code.occupied_voxels(),
        "clip_back": round(back / n, 6) if n else 0.0,
        "clip_front": round(front / n, 6) if n else 0.0,
    }


class VoxelizeStage(Stage):
    """The voxelize stage.

    Args:
        depth_bins, depth_factor, size: volume layout (:mod:`vrn.conventions`).
        back_offset: crop px from the deepest frontal vertex to the back plane (None:
            the voxelizer's default).
    """

    name = "voxelize"
    previous = "fit"

    def __init__(
        self,
        depth_bins: int = DEPTH_BINS,
        depth_factor: float = DEPTH_FACTOR,
        size: int = CROP_SIZE,
        back_offset: float | None = None,
    ) -> None:
        self.depth_bins = int(depth_bins)
        self.depth_factor = float(depth_factor)
        self.size = int(size)
        self.back_offset = None if back_offset is None else float(back_offset)

    def params(self) -> dict[str, Any]:
        return {
            "depth_bins": self.depth_bins,
            "depth_factor": self.depth_factor,
            "size": self.size,
            "back_offset": self.back_offset,
        }

    def process(self, item: Item, ctx: ItemContext) -> list[dict[str, Any]]:
        s = dict(item.data)
        m = load_fit_mesh(ctx.out_dir, s)
        verts, tris, R = m["verts"].astype(np.float32), m["tris"].astype(np.int32), m["R"].astype(np.float64)
        try:
            code = voxelize_face(
                verts,
                tris,
                R,
                depth_bins=self.depth_bins,
                depth_factor=self.depth_factor,
                size=self.size,
                back_offset=self.back_offset,
            )
        except Exception as e:
            raise ItemFailure("voxelize_failed", f"{type(e).__name__}: {e}") from e
        stats = volume_stats(code)
        xy = verts[:, :2]
        outside = float(((xy < -0.5) | (xy > self.size - 0.5)).any(axis=1).mean())
        vol = ctx.write_bytes(f"items/{item.id}.vol", to_bytes(code))
        return [{**s, **stats, "outside_fraction": round(outside, 6), "files": {**s["files"], "volume": vol}}]


@hydra.main(version_base="1.3", config_path="../conf/pipeline", config_name="voxelize")
def main(cfg: DictConfig) -> None:
    run_single_stage(cfg, "voxelize")


if __name__ == "__main__":
    main()
