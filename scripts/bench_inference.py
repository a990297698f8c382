#!/usr/bin/env python
"""Image -> mesh on the CPU, split by stage (detect, crop, network, marching cubes, colour, export).

    VRN_ASSETS_DIR=../shared/assets python scripts/bench_inference.py [--image PHOTO] [--model vrn_unguided]
        [--detector tddfa] [--runs 5] [--threads N] [--export-only] [--onnx [--ckpt CKPT]]

``--export-only``: only the mesh writers (no detector, no network), on the synthetic mesh
with random colours. ``--onnx``: only the network, torch vs onnxruntime (its ONNX export,
:mod:`vrn.export`) on one crop (batch 1, fp32), with the largest probability difference and
the fraction of voxels whose occupancy at 0.5 differs; ``--ckpt`` times a trained checkpoint
(a path or a shipped model's name, e.g. ``pretrained``) instead of random weights; a guided
model gets landmarks spread over the crop as its second input.

* detect / crop: the project's detector (``vrn.detectors``) and VRN crop
  (``vrn.geometry.crop.crop_face``) on a real photo, one face;
* network: the model with random weights (timing only), one 192 x 192 crop, float32;
* marching cubes (+ the map to image px) and colour sampling: on a *realistic* probability
  volume -- the ground-truth occupancy of a synthetic face blurred by a 1-voxel Gaussian
  (a random network's output is noise, whose iso-surface has millions of triangles and
  says nothing about a trained model);
* export: that mesh written as .obj and .ply (per-vertex colour) by :mod:`vrn.volume.mesh`'s
  numpy writers; beside them (not in the total) each format alone, and trimesh's own
  writer (the code before the numpy writers) for comparison;
* render (not in the total): overlay PNG, depth PNG, 24-frame 256 px turntable GIF.

Prints a Markdown table of medians over ``--runs`` (first call of each stage excluded).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

from vrn.bench_timing import median_ms


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default=str(here.parent / "shared" / "data" / "images" / "AFLW_image00046.jpg"))
    ap.add_argument("--model", default="vrn_unguided")
    ap.add_argument("--detector", default="tddfa")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--export-only", action="store_true", help="time only the mesh writers")
    ap.add_argument("--onnx", action="store_true", help="time only the network: torch vs onnxruntime")
    ap.add_argument("--ckpt", default=None, help="with --onnx: a checkpoint instead of random weights")
    args = ap.parse_args()
    if args.export_only:
        bench_export(args.runs)
        return
    if args.onnx:
        bench_onnx(args.model, args.ckpt, args.runs, args.threads)
        return

    import scipy.ndimage as ndi
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from vrn import render
    from vrn.conventions import TDDFA_ROI_PX, VolumeLayout
    from vrn.data.synthetic import SyntheticFaceConfig, render_sample
    from vrn.detectors import get_detector
    from vrn.geometry.crop import crop_face, crop_for_layout
    from vrn.image_io import read_image_rgb
    from vrn.inference import Reconstructor, sample_vertex_colors, volume_to_image_mesh
    from vrn.models import create_model
    from vrn.volume.codec import decode
    from vrn.volume.mesh import export_mesh

    image = read_image_rgb(args.image)
    det = get_detector(args.detector)
    t_det, dets = median_ms(lambda: det.detect(image, args.image), args.runs)
    if not dets:
        raise SystemExit(f"no face found in {args.image}")
    d0 = dets[0]
    t_crop, (crop, T) = median_ms(lambda: crop_face(image, d0.landmarks), args.runs * 4)
    roi_layout = VolumeLayout(source_roi_px=TDDFA_ROI_PX)  # the shipped model's: through 3DDFA's ROI
    t_crop_roi, _ = median_ms(lambda: crop_for_layout(image, d0.landmarks, roi_layout), args.runs * 4)

    torch.manual_seed(0)
    net = create_model(args.model).eval()
    rec = Reconstructor(net, detector=None, flip_tta=False)  # one network pass (flip_tta doubles it)
    x = crop.transpose(2, 0, 1)[None]
    t_net, _ = median_ms(lambda: rec.reconstruct_crops(x), args.runs)

    _, code, _ = render_sample(SyntheticFaceConfig(), np.random.default_rng(0))
    prob = ndi.gaussian_filter(decode(code).astype(np.float32), 1.0)
    t_mc, (verts, faces) = median_ms(lambda: volume_to_image_mesh(prob, T), args.runs * 2)
    t_col, colors = median_ms(lambda: sample_vertex_colors(image, verts), args.runs * 2)
    tmp = Path(tempfile.mkdtemp(prefix="vrn_bench_"))
    t_exp, _ = median_ms(
        lambda: [export_mesh(tmp / f"face.{e}", verts, faces, colors) for e in ("obj", "ply")], args.runs
    )
    H, W = image.shape[:2]
    t_ov, _ = median_ms(
        lambda: render.save_png(tmp / "o.png", render.render_overlay(image, [(verts, faces)])), args.runs
    )
    t_dp, _ = median_ms(lambda: render.save_png(tmp / "d.png", render.render_depth(verts, faces, H, W)[0]), args.runs)
    t_tt, _ = median_ms(lambda: render.save_gif(tmp / "t.gif", render.render_turntable(verts, faces, colors)), 2)

    total = t_det + t_crop + t_net + t_mc + t_col + t_exp
    rows = [
        ("detect (" + args.detector + ")", t_det),
        ("crop", t_crop),
        (f"(crop through the {TDDFA_ROI_PX} px ROI instead, source_roi_px models)", t_crop_roi),
        (f"network ({args.model}, fp32)", t_net),
        ("marching cubes + to image px", t_mc),
        ("vertex colours", t_col),
        ("export .obj + .ply", t_exp),
        ("**total per face**", total),
    ]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"image: {Path(args.image).name} {W}x{H}, {len(dets)} face(s); mesh {len(verts)} verts / {len(faces)} tris; "
        f"median of {args.runs} runs (warm)\n"
    )
    print("| stage | ms |\n|---|---:|")
    for name, t in rows:
        print(f"| {name} | {t:.0f} |")
    print("\nnot in the total:\n\n| render | ms |\n|---|---:|")
    for name, t in (("overlay PNG", t_ov), ("depth PNG", t_dp), ("turntable GIF (24 frames, 256 px)", t_tt)):
        print(f"| {name} | {t:.0f} |")


def bench_export(runs: int) -> None:
    """The mesh writers alone: numpy .obj / .ply vs trimesh's export, on a synthetic face mesh."""
    import scipy.ndimage as ndi
    import trimesh

    from vrn.data.synthetic import SyntheticFaceConfig, render_sample
    from vrn.volume.codec import decode
    from vrn.volume.mesh import export_mesh, volume_to_mesh

    _, code, _ = render_sample(SyntheticFaceConfig(), np.random.default_rng(0))
    verts, faces = volume_to_mesh(ndi.gaussian_filter(decode(code).astype(np.float32), 1.0))
    colors = np.random.default_rng(0).integers(0, 256, (len(verts), 3), dtype=np.uint8)
    tmp = Path(tempfile.mkdtemp(prefix="vrn_bench_"))

    def old(ext: str) -> None:  # the writer before vrn.volume.mesh had its own (trimesh formats the text)
        m = trimesh.Trimesh(verts.astype(np.float64), faces.astype(np.int64), vertex_colors=colors, process=False)
        data = m.export(file_type=ext)
        (tmp / f"old.{ext}").write_bytes(data.encode() if isinstance(data, str) else data)

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load average "
        f"{os.getloadavg()[0]:.2f}; mesh {len(verts)} verts / {len(faces)} tris, coloured; median of {runs} runs\n"
    )
    print("| format | trimesh export (before), ms | vrn.volume.mesh (after), ms |\n|---|---:|---:|")
    for ext in ("obj", "ply", "glb"):
        t_old, _ = median_ms(lambda e=ext: old(e), runs)
        t_new, _ = median_ms(lambda e=ext: export_mesh(tmp / f"face.{e}", verts, faces, colors), runs)
        print(f"| .{ext} | {t_old:.0f} | {t_new:.0f} |")


def bench_onnx(model: str, ckpt: str | None, runs: int, threads: int) -> None:
    """The network alone, batch 1, fp32: torch vs onnxruntime (same thread count)."""
    import torch

    from vrn.export import OnnxNetwork, compare_backends, example_landmarks, onnx_bytes
    from vrn.inference import Reconstructor
    from vrn.models import create_model

    if threads:
        torch.set_num_threads(threads)
    if ckpt:
        from vrn.checkpoint import resolve_model_file

        rec = Reconstructor.from_checkpoint(resolve_model_file(ckpt), detector=None, flip_tta=False)
        net, spec, layout = rec.net, rec.model_spec, rec.layout
    else:
        torch.manual_seed(0)
        net, spec = create_model(model).eval(), {"name": model}
        layout = Reconstructor(net, detector=None).layout
    s = layout.crop_size
    onnx_net = OnnxNetwork(onnx_bytes(net, layout, spec))
    # one network pass each (flip_tta, on by default, would double both)
    rec_t = Reconstructor(net, detector=None, layout=layout, model_spec=spec, flip_tta=False)
    rec_o = Reconstructor(onnx_net, detector=None, flip_tta=False)
    x = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(0))
    guided = rec_t.needs_landmarks  # a guided network also takes (B, 68, 2) crop px landmarks
    m1, m4 = (example_landmarks(1, s), example_landmarks(4, s)) if guided else (None, None)
    t_torch, _ = median_ms(lambda: rec_t.reconstruct_crops(x, m1), runs)
    t_ort, _ = median_ms(lambda: rec_o.reconstruct_crops(x, m1), runs)
    d = compare_backends(net, onnx_net, torch.rand(4, 3, s, s, generator=torch.Generator().manual_seed(1)), m4)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}; "
        f"{spec.get('name')} ({'weights ' + ckpt if ckpt else 'random weights'}), {s}x{s} crop, batch 1, fp32, "
        f"median of {runs} runs\n"
    )
    print("| backend | network ms (incl. sigmoid) |\n|---|---:|")
    print(f"| torch | {t_torch:.0f} |\n| onnxruntime | {t_ort:.0f} |")
    print(
        f"\n4 random crops: max |p_torch - p_ort| = {d['max_abs']:.2e}; occupancy (p > 0.5) differs at "
        f"{d['flip_fraction']:.2e} of {int(d['voxels'])} voxels"
    )


if __name__ == "__main__":
    main()
