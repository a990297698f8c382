"""Stage 5, pack: the reaped samples -> a packed dataset split by subject.

``python -m data_pipeline.pack input_dir=<out>/reap output_dir=<out>/packed``

Train / val / test are split BY SUBJECT (never one person in two splits): a subject is
the source image's file stem cut by the first of ``subject_patterns`` that matches (its
first group); no match: the stem itself. The defaults handle 300W-LP
(``IBUG_image_008_1_0`` -> ``IBUG_image_008``, ``LFPW_image_test_0001_3`` ->
``LFPW_image_test_0001``; the ``*_Flip`` folders share their subjects) and AFLW2000-3D
(``image00050``: each image its own subject). All faces of one photo share its subject.
The sorted subjects are shuffled with ``seed`` and cut by ``fractions``: the same inputs
always give the same split.

Layout: ``meta.json``'s ``layout`` (:class:`vrn.conventions.VolumeLayout`) is what the
upstream stages actually used, read from their manifests' ``params`` by following each
manifest's ``input_dir`` back from ``reap``: ``crop_size``, ``face_size`` and
``source_roi_px`` (0 when not recorded) from the crop stage, ``depth_bins`` and
``depth_factor`` from the voxelize stage (whose ``size`` must equal the crop's
``crop_size``, else :class:`~data_pipeline.stage.PipelineInputError`).

Output: :class:`vrn.data.packed.PackedWriter`'s folder (``meta.json``, ``manifest.jsonl``,
``index.npy`` with per-sample CRC-32s, ``images.bin``, ``targets.bin``), written under
``<output_dir>.partial`` and renamed into place (a failed write removes the ``.partial``
folder and reports its own error: a full disk stops the run with ``No space left on
device``); crops stored as JPEG quality 95 by default (a sample, crop + target, stays
well under 100 KB). Manifest rows carry provenance: id, split, subject,
source image, detector and score, fit source, bfm_source, dense model, CropTransform,
head rotation, the 68 fitted landmarks (crop px) and the crop's padding fraction.
``data=folder data.root=<output_dir>`` trains on it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from data_pipeline.run import run_single_stage
from data_pipeline.stage import MANIFEST, PipelineInputError, Stage, load_manifest, load_npz
from vrn.conventions import VolumeLayout
from vrn.data.packed import PackedReader, PackedWriter
from vrn.image_io import read_image_rgb
from vrn.volume.codec import from_bytes

__all__ = [
    "PackStage",
    "subject_of",
    "split_subjects",
    "subject_rank_key",
    "upstream_params",
    "upstream_layout",
    "DEFAULT_SUBJECT_PATTERNS",
]

DEFAULT_SUBJECT_PATTERNS = (
    r"^(LFPW_image_(?:test|train)_\d+)_\d+$",  # 300W-LP LFPW: <image>_<view>
    r"^((?:AFW|HELEN|IBUG)_.+?)_\d+_\d+$",  # 300W-LP AFW / HELEN / IBUG: <image>_<face>_<view>
)


def subject_of(source_image: str, patterns: tuple[str, ...] | list[str] = DEFAULT_SUBJECT_PATTERNS) -> str:
    """Subject id of a source image path (see the module doc)."""
    stem = PurePosixPath(source_image).stem
    for pat in patterns:
        m = re.match(pat, stem)
        if m:
            return m.group(1) if m.groups() else m.group(0)
    return stem


def subject_rank_key(subject: str, seed: int) -> str:
    """A subject's place in the split order of :func:`split_subjects`: the hex sha256 of
    ``"<seed>:<subject>"``, independent of every other subject."""
    return hashlib.sha256(f"{int(seed)}:{subject}".encode()).hexdigest()


def split_subjects(subjects: list[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Assign each subject to a split, deterministically by ``seed``.

    Unique subjects are ranked by ``sha256(f"{seed}:{subject}")`` (:func:`subject_rank_key`);
    each split other than ``train`` takes, in name order, the next ``round(fraction * n)``
    subjects of that ranking (at least one when its fraction is > 0 and there are at least as
    many subjects as splits); ``train`` the rest. A subject's rank does not depend on the
    other subjects, so a rebuild that keeps or drops a few faces (another fitter, another
    reap threshold) keeps the split: only subjects near a cut can change side. (Until
    pack version 2 the sorted subjects were shuffled with ``np.random.default_rng(seed)``,
    which reshuffled the whole split when one subject came or went: a rebuild of AFLW with
    ``fitter.flip=true`` put 891 of its 951 val faces in the earlier pack's train split.)
    """
    order = sorted(set(subjects), key=lambda subject: subject_rank_key(subject, seed))
    n = len(order)
    for k, v in fractions.items():
        if v < 0:
            raise ValueError(f"pack.fractions.{k} must be >= 0, got {v}")
    if "train" not in fractions:
        raise ValueError("pack.fractions needs a 'train' entry")
    total = sum(fractions.values()) or 1.0
    others = [k for k in sorted(fractions) if k != "train"]
    counts = {}
    for k in others:
        c = int(round(fractions[k] / total * n))
        if fractions[k] > 0 and n >= len(fractions):
            c = max(c, 1)
        counts[k] = c
    while sum(counts.values()) > max(0, n - 1) and any(counts.values()):  # keep >= 1 train subject
        k = max(counts, key=lambda x: counts[x])
        counts[k] -= 1
    out: dict[str, str] = {}
    i = 0
    for k in others:
        for s in order[i : i + counts[k]]:
            out[s] = k
        i += counts[k]
    for s in order[i:]:
        out[s] = "train"
    return out


def upstream_params(input_dir: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """``{stage name: (its folder, its recorded params)}`` for ``manifest`` (the manifest of
    ``input_dir``) and every stage upstream of it, found by following each manifest's
    ``input_dir`` (relative to its own folder) back to the ``crop`` stage."""
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    folder = Path(input_dir)
    while True:
        name = manifest.get("stage")
        if name in found:  # pragma: no cover - manifests never point at themselves
            break
        found[name] = (folder, dict(manifest.get("params", {})))
        if name == "crop" or not manifest.get("input_dir") or not manifest.get("upstream_stage"):
            break
        folder = Path(os.path.normpath(folder / manifest["input_dir"]))
        manifest = load_manifest(folder, manifest["upstream_stage"])
    return found


def upstream_layout(input_dir: str | os.PathLike, manifest: dict[str, Any]) -> VolumeLayout:
    """The crop / volume layout the upstream stages used (module doc).

    Args:
        input_dir: the reap stage's output folder (any stage after voxelize works).
        manifest: that folder's ``manifest.json``.

    Raises:
        PipelineInputError: the crop or voxelize stage's manifest cannot be reached, or the
            voxelize stage's ``size`` differs from the crop stage's ``crop_size``.
    """
    found = upstream_params(input_dir, manifest)
    for need in ("crop", "voxelize"):
        if need not in found:
            raise PipelineInputError(
                f"pack records the dataset layout from the '{need}' stage, but no '{need}' {MANIFEST} is "
                f"upstream of input_dir={input_dir} (followed: {' <- '.join(map(str, found))}); keep the stage "
                f"folders of one pipeline run together (python -m data_pipeline.run writes them side by side)."
            )
    (crop_dir, crop), (vox_dir, vox) = found["crop"], found["voxelize"]
    if int(vox["size"]) != int(crop["crop_size"]):
        raise PipelineInputError(
            f"the crop stage made {crop['crop_size']} px crops (crop.crop_size, {crop_dir}) but the voxelize "
            f"stage made {vox['size']} px volumes (voxelize.size, {vox_dir}): rerun voxelize, reap and pack "
            f"with voxelize.size={crop['crop_size']}."
        )
    return VolumeLayout(
        crop_size=crop["crop_size"],
        face_size=crop["face_size"],
        depth_bins=vox["depth_bins"],
        depth_factor=vox["depth_factor"],
        source_roi_px=crop.get("source_roi_px", 0),
    )


def _manifest_row(s: dict[str, Any], split: str, subject: str, landmarks: np.ndarray) -> dict[str, Any]:
    """The packed manifest row of one reaped sample (provenance, transform, landmarks in crop px);
    key order fixed (it is part of the packed bytes)."""
    provenance = (
        "detector",
        "score",
        "fit_source",
        "bfm_source",
        "dense_model",
        "transform",
        "rotation",
        "pad_fraction",
    )
    return {
        "id": s["id"],
        "split": split,
        "subject": subject,
        "source_image": s["source_image"],
        "face_index": s.get("face_index", 0),
        **{k: s.get(k) for k in provenance},
        "landmarks": np.round(np.asarray(landmarks, np.float64), 3).tolist(),
    }


class PackStage(Stage):
    """The pack stage (module doc).

    Args:
        fractions: split name -> fraction of subjects (must contain ``train``).
        seed: split seed (:func:`split_subjects`).
        subject_patterns: regexes (first group = subject) tried in order on the file stem.
        image_codec: ".jpg" (default) or ".png".
        jpeg_quality: JPEG quality.
        max_sample_bytes: warn when a sample (crop + target) is larger.
    """

    name = "pack"
    version = 2  # 2: subjects split by their sha256 rank (split_subjects), stable under rebuilds
    kind = "reduce"
    previous = "reap"

    def __init__(
        self,
        fractions: dict[str, float] | None = None,
        seed: int = 0,
        subject_patterns: list[str] | tuple[str, ...] = DEFAULT_SUBJECT_PATTERNS,
        image_codec: str = ".jpg",
        jpeg_quality: int = 95,
        max_sample_bytes: int = 100_000,
    ) -> None:
        self.fractions = {str(k): float(v) for k, v in (fractions or {"train": 0.8, "val": 0.1, "test": 0.1}).items()}
        self.seed = int(seed)
        self.subject_patterns = [str(p) for p in subject_patterns]
        for p in self.subject_patterns:
            re.compile(p)
        if image_codec not in (".jpg", ".jpeg", ".png"):
            raise ValueError(f"pack.image_codec must be .jpg or .png, got {image_codec!r}")
        self.image_codec = image_codec
        self.jpeg_quality = int(jpeg_quality)
        self.max_sample_bytes = int(max_sample_bytes)

    def params(self) -> dict[str, Any]:
        return {
            "fractions": self.fractions,
            "seed": self.seed,
            "subject_patterns": self.subject_patterns,
            "image_codec": self.image_codec,
            "jpeg_quality": self.jpeg_quality,
            "max_sample_bytes": self.max_sample_bytes,
        }

    def reduce(self, upstream: dict[str, Any], input_dir: Path, out_dir: Path, progress: bool) -> dict[str, Any]:
        """Split by subject, write every reaped sample into one packed folder (atomically, through
        :class:`~vrn.data.packed.PackedWriter`) with the layout the stages used; returns the summary."""
        layout = upstream_layout(input_dir, upstream)
        samples = sorted(upstream["samples"], key=lambda s: s["id"])
        if not samples:
            raise ValueError(f"{input_dir}: no samples to pack (all dropped: see {input_dir}/summary.json)")
        subjects = {s["id"]: subject_of(s["source_image"], self.subject_patterns) for s in samples}
        split_of_subject = split_subjects(list(subjects.values()), self.fractions, self.seed)
        provenance = {
            "input_dir": os.path.relpath(input_dir, out_dir),
            "input_stage": upstream.get("stage"),
            "fingerprint": upstream["_fingerprint"],
        }
        meta = {
            "source": "data_pipeline",
            "pipeline": provenance,
            "subjects": {k: sum(v == k for v in split_of_subject.values()) for k in sorted(self.fractions)},
            "dropped": upstream.get("summary", {}).get("dropped", {}),
        }
        with PackedWriter(
            out_dir,
            image_codec=self.image_codec,
            jpeg_quality=self.jpeg_quality,
            extra_meta=meta,
            overwrite=True,
            layout=layout,
        ) as w:
            for s in tqdm(samples, desc="pack", unit="sample", disable=not progress):
                files = s["files"]
                crop = read_image_rgb(input_dir / files["crop"])
                code = from_bytes((input_dir / files["volume"]).read_bytes())
                mesh = load_npz(input_dir / files["mesh"])
                subj = subjects[s["id"]]
                w.add(crop, code, _manifest_row(s, split_of_subject[subj], subj, mesh["landmarks"]))
        reader = PackedReader(out_dir)
        sizes = reader.index[:, 1] + reader.index[:, 3]
        too_big = int((sizes > self.max_sample_bytes).sum())
        summary = {
            "num_samples": len(reader),
            "splits": reader.meta["splits"],
            "subjects": meta["subjects"],
            "bytes_per_sample_mean": float(sizes.mean()),
            "bytes_per_sample_max": int(sizes.max()),
            "samples_over_limit": too_big,
        }
        msg = (
            f"pack: {len(reader)} samples {reader.meta['splits']} from {len(split_of_subject)} subjects; "
            f"{sizes.mean() / 1000:.1f} KB per sample (max {sizes.max() / 1000:.1f} KB)"
        )
        print(msg)
        if too_big:
            print(f"pack: WARNING {too_big} samples exceed pack.max_sample_bytes={self.max_sample_bytes}")
        return summary


@hydra.main(version_base="1.3", config_path="../conf/pipeline", config_name="pack")
def main(cfg: DictConfig) -> None:
    run_single_stage(cfg, "pack")


if __name__ == "__main__":
    main()
