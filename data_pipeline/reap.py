"""Stage 4, reap: keep the good samples, drop the rest with a reason.

``python -m data_pipeline.reap input_dir=<out>/voxelize output_dir=<out>/reap``

Dropped (reason code in the manifest's ``failures``; thresholds under ``reap.*``):

=====================  ================================================================
no_face                crop: the detector found no face (also ``unreadable_image``)
fit_failed             fit: the fit raised / gave a non-finite mesh (``fit_mismatch``,
                       ``no_fit`` for .mat fits)
voxelize_failed        voxelize raised
empty_volume           fewer than ``min_occupied_columns`` occupied pixel columns
clipped_volume         more than ``max_clipped_front`` of the occupied columns reach the
                       last depth bin (the visible surface was cut: nose / forehead), or
                       more than ``max_clipped_back`` reach bin 0 (the filled-back solid
                       was cut; its back is a synthetic plane, so this limit is lenient)
outside_crop           more than ``max_outside_fraction`` of the mesh lies outside the
                       crop's x/y range
outside_image          more than ``max_pad_fraction`` of the crop's pixels are padding
                       (the crop mostly lies outside the photo)
low_score              detector score below ``min_score``
=====================  ================================================================

Writes ``manifest.json`` (kept samples + every drop with its reason, from every stage) and
``summary.json`` (``kept``, ``dropped`` count per reason), also printed.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from data_pipeline.run import run_single_stage
from data_pipeline.stage import TMP_DIR, Item, ItemContext, ItemFailure, Stage, dumps_json
from vrn.atomic_write import atomic_write

__all__ = ["ReapStage", "summarize"]


def summarize(manifest: dict[str, Any]) -> dict[str, Any]:
    """``{"kept": n, "dropped": {reason: count}, "dropped_total": n}`` of a manifest."""
    c = Counter(f["reason"] for f in manifest["failures"])
    return {"kept": len(manifest["samples"]), "dropped": dict(sorted(c.items())), "dropped_total": int(sum(c.values()))}


class ReapStage(Stage):
    """The reap stage (module doc)."""

    name = "reap"
    previous = "voxelize"
    parallel = False

    def __init__(
        self,
        min_occupied_columns: int = 1000,
        max_clipped_front: float = 0.01,
        max_clipped_back: float = 0.5,
        max_outside_fraction: float = 0.2,
        max_pad_fraction: float = 0.5,
        min_score: float = 0.0,
    ) -> None:
        self.min_occupied_columns = int(min_occupied_columns)
        self.max_clipped_front = float(max_clipped_front)
        self.max_clipped_back = float(max_clipped_back)
        self.max_outside_fraction = float(max_outside_fraction)
        self.max_pad_fraction = float(max_pad_fraction)
        self.min_score = float(min_score)

    def params(self) -> dict[str, Any]:
        return {
            "min_occupied_columns": self.min_occupied_columns,
            "max_clipped_front": self.max_clipped_front,
            "max_clipped_back": self.max_clipped_back,
            "max_outside_fraction": self.max_outside_fraction,
            "max_pad_fraction": self.max_pad_fraction,
            "min_score": self.min_score,
        }

    def process(self, item: Item, ctx: ItemContext) -> list[dict[str, Any]]:
        s = item.data
        if s.get("score", 1.0) < self.min_score:
            raise ItemFailure("low_score", f"detector score {s['score']:.3f} < reap.min_score={self.min_score}")
        if s.get("pad_fraction", 0.0) > self.max_pad_fraction:
            raise ItemFailure(
                "outside_image",
                f"{100 * s['pad_fraction']:.0f}% of the crop is padding "
                f"(> reap.max_pad_fraction={self.max_pad_fraction})",
            )
        if s["occupied_columns"] < self.min_occupied_columns:
            raise ItemFailure(
                "empty_volume",
                f"{s['occupied_columns']} occupied columns (< reap.min_occupied_columns={self.min_occupied_columns})",
            )
        if s["clip_front"] > self.max_clipped_front:
            raise ItemFailure(
                "clipped_volume",
                f"{100 * s['clip_front']:.1f}% of the occupied columns reach the "
                f"front of the volume (> reap.max_clipped_front="
                f"{self.max_clipped_front})",
            )
        if s["clip_back"] > self.max_clipped_back:
            raise ItemFailure(
                "clipped_volume",
                f"{100 * s['clip_back']:.1f}% of the occupied columns reach the "
                f"back of the volume (> reap.max_clipped_back={self.max_clipped_back})",
            )
        if s.get("outside_fraction", 0.0) > self.max_outside_fraction:
            raise ItemFailure(
                "outside_crop",
                f"{100 * s['outside_fraction']:.0f}% of the mesh lies outside the "
                f"crop (> reap.max_outside_fraction={self.max_outside_fraction})",
            )
        return [dict(s)]

    def finalize(self, manifest: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        summary = summarize(manifest)
        manifest = {**manifest, "summary": summary}
        atomic_write(out_dir / "summary.json", dumps_json(summary), out_dir / TMP_DIR, fsync=False)
        lines = [f"reap: kept {summary['kept']}, dropped {summary['dropped_total']}"]
        lines += [f"  {reason:<18} {n}" for reason, n in summary["dropped"].items()]
        print("\n".join(lines))
        return manifest


@hydra.main(version_base="1.3", config_path="../conf/pipeline", config_name="reap")
def main(cfg: DictConfig) -> None:
    run_single_stage(cfg, "reap")


if __name__ == "__main__":
    main()
