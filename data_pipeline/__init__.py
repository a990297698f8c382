"""Data pipeline for VRN training data: crop -> fit -> voxelize -> reap -> pack.

Each stage is a Hydra job (``python -m data_pipeline.<stage> input_dir=... output_dir=...``)
run by one runner (:mod:`data_pipeline.stage`); ``python -m data_pipeline.run`` chains them.
See docs/pipeline.md.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _ensure_tddfa_v2_importable() -> None:
    """From a source checkout, put ``third_party/3ddfa_v2`` on sys.path (an installed
    package maps ``tddfa_v2`` itself, see pyproject.toml)."""
    if importlib.util.find_spec("tddfa_v2") is None:
        p = Path(__file__).resolve().parents[1] / "third_party" / "3ddfa_v2"
        if p.is_dir() and str(p) not in sys.path:
            sys.path.insert(0, str(p))


_ensure_tddfa_v2_importable()
