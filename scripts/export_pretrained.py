"""Write the slim shipped checkpoint (model spec + layout + network weights) from a training
checkpoint and print its sha256 for ``vrn/assets.py`` (``PRETRAINED_SHA256``).

    python scripts/export_pretrained.py outputs/train/runs/<run>/checkpoints/<best>.ckpt \
        --out vrn/pretrained/vrn_medium_aflw.ckpt
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from vrn.assets import sha256_of
from vrn.checkpoint import load_network, save_network


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--out", default="vrn/pretrained/vrn_medium_aflw.ckpt")
    ap.add_argument(
        "--source-roi-px",
        type=int,
        default=None,
        help="record the training photos' crop side (120 for the AFLW crops) in a checkpoint trained "
        "before the layout recorded it (vrn.conventions, VolumeLayout.source_roi_px)",
    )
    a = ap.parse_args()
    net, spec, layout = load_network(a.ckpt)
    if a.source_roi_px is not None:
        layout = replace(layout, source_roi_px=a.source_roi_px)
    p = save_network(a.out, net, spec, layout)
    print(f"{p}: {p.stat().st_size / 1e6:.2f} MB, model {spec}, layout {layout.to_dict()}")
    print(f"sha256 {sha256_of(p)}")


if __name__ == "__main__":
    main()
