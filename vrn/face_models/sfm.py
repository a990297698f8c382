"""The Surrey Face Model (Huber et al., VISAPP 2016), loaded with eos-py.

Model frame: millimetres, x to the subject's left (image right), y up, z toward the camera.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from vrn.assets import resolve

__all__ = ["SurreyFaceModel", "load_sfm", "load_sfm_contours"]


@dataclass(frozen=True)
class SurreyFaceModel:
    """Linear face model arrays (numpy, ready for vectorised sampling).

    mean: (V, 3) float32 mm; shape_basis: (V*3, S) float32, columns scaled by sqrt(eigenvalue)
    so coefficients are N(0, 1); expression_basis: (V*3, E) float32 blendshape deformations;
    expression_names: E names; tris: (F, 3) int32; landmarks: {iBUG index 1..68: vertex id}.
    """

    mean: np.ndarray
    shape_basis: np.ndarray
    expression_basis: np.ndarray
    expression_names: tuple[str, ...]
    tris: np.ndarray
    landmarks: dict[int, int]

    def vertices(self, shape_coeffs: np.ndarray, expression_coeffs: np.ndarray) -> np.ndarray:
        """(S,), (E,) coefficients -> (V, 3) float32 mm, model frame."""
        flat = self.mean.reshape(-1) + self.shape_basis @ shape_coeffs + self.expression_basis @ expression_coeffs
        return flat.reshape(-1, 3).astype(np.float32)


def _parse_ibug_mapping(text: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\d+)\s*=\s*(\d+)", line)
        if m:
            out[int(m.group(1))] = int(m.group(2))
    return out


@lru_cache(maxsize=2)
def load_sfm(
    shape_path: str | None = None, blendshapes_path: str | None = None, mapping_path: str | None = None
) -> SurreyFaceModel:
    """Load the 3448-vertex SFM through the asset registry (explicit paths win)."""
    try:
        import eos
    except ImportError as e:  # pragma: no cover - eos-py is a hard dependency
        raise ImportError("The Surrey Face Model needs the PyPI package 'eos-py' (pip install eos-py)") from e
    model = eos.morphablemodel.load_model(str(resolve("sfm/sfm_shape_3448.bin", shape_path)))
    blend = eos.morphablemodel.load_blendshapes(str(resolve("sfm/expression_blendshapes_3448.bin", blendshapes_path)))
    sm = model.get_shape_model()
    mean = np.asarray(sm.get_mean(), dtype=np.float32).reshape(-1, 3)
    basis = np.asarray(sm.get_orthonormal_pca_basis(), dtype=np.float32)
    eig = np.asarray(sm.get_eigenvalues(), dtype=np.float32)
    shape_basis = basis * np.sqrt(np.maximum(eig, 0))[None, :]
    expr = np.stack([np.asarray(b.deformation, dtype=np.float32) for b in blend], axis=1)
    tris = np.asarray(sm.get_triangle_list(), dtype=np.int32)
    mapping = _parse_ibug_mapping(open(resolve("sfm/ibug_to_sfm.txt", mapping_path)).read())
    return SurreyFaceModel(mean, shape_basis, expr, tuple(b.name for b in blend), tris, mapping)


@lru_cache(maxsize=2)
def load_sfm_contours(path: str | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """SFM vertex ids of the face outline (eos ``sfm_model_contours.json``, "model_contour"):
    (subject's right, subject's left), each from the temple down to the chin."""
    p = resolve("sfm/sfm_model_contours.json", path)
    try:
        mc = json.loads(open(p).read())["model_contour"]
        return tuple(int(i) for i in mc["right_contour"]), tuple(int(i) for i in mc["left_contour"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{p} is not eos' sfm_model_contours.json (model_contour.right_contour / left_contour): {e}"
        ) from e
