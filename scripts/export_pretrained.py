"""Write the slim shipped checkpoint (model spec + layout + network weights) from a training
checkpoint and print its sha256 for ``vrn/assets.py`` (``PRETRAINED_SHA256``).

    python scripts/export_pretrained.py outputs/train/runs/<run>/checkpoints/<best>.ckpt \
        --out vrn/pretrained/vrn_medium_aflw.ckpt
"""

from __future__ import annotations

import argparse

from vrn.assets import sha256_of
from vrn.checkpoint import load_network, save_network


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--out", default="vrn/pretrained/vrn_medium_aflw.ckpt")
    a = ap.parse_args()
    net, spec, layout = load_network(a.ckpt)
    p = save_network(a.out, net, spec, layout)
    print(f"{p}: {p.stat().st_size / 1e6:.2f} MB, model {spec}, layout {layout.to_dict()}")
    print(f"sha256 {sha256_of(p)}")


if __name__ == "__main__":
    main()
