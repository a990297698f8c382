"""Data pipeline for VRN training data: crop -> fit -> voxelize -> reap -> pack.

Each stage is a Hydra job (``python -m data_pipeline.<stage> input_dir=... output_dir=...``)
written against the stage API (:mod:`data_pipeline.stage`) and run by one runner
(:mod:`data_pipeline.runner`); ``python -m data_pipeline.run`` chains them.
See docs/pipeline.md.
"""

from __future__ import annotations
