"""Fit the Surrey Face Model (SFM, :mod:`vrn.face_models.sfm`) to 68 3D landmarks.

The data pipeline's ``fitter=sfm`` uses this to turn the 3DDFA_V2 port's 68 3D landmarks
into a dense target mesh with a real identity / expression prior, instead of the offline
BFM stand-in's "mean face + landmark spline" (:mod:`vrn.face_models.bfm`).

Frames
    * SFM model frame: millimetres, x to the subject's left (image right), y UP, z toward
      the camera.
    * Crop frame (:mod:`vrn.conventions`): crop px, x right, y DOWN, z toward the camera,
      z in the same unit as x / y.
    * "frontal": the model turned into the crop frame's orientation, ``F v`` with
      ``F = diag(1, -1, 1)`` (the y flip). A fitted face is
      ``posed = s R (F v) + t`` with R a proper rotation (det +1) in the crop frame, so
      ``posed = R @ frontal`` up to scale and translation, as for the BFM fitters
      (:func:`vrn.face_models.bfm.rotation_to_crop_frame`).

Model
    ``v(alpha, beta) = mean + shape_basis @ alpha + expression_basis @ beta`` with
    ``alpha`` (63) scaled to N(0, 1) and ``beta`` (6) blendshape weights.

Landmark correspondence
    eos' ``ibug_to_sfm.txt`` maps 50 of the 68 iBUG points to SFM vertices: the chin (9),
    brows, nose, eyes and lips (18..60, 62..64, 66..68). Not mapped: the 16 jaw-contour
    points 1..8 and 10..17, and the inner mouth corners 61 and 65. The inner mouth corners
    are left out of the fit (NaN in :attr:`SFMFit.landmarks`). The contour points are fitted
    (``contour=True``) to the nearest point of the SFM's model contour (eos'
    ``sfm_model_contours.json``: 17 vertices per side, the face outline of the frontal
    face), a polyline densified by linear interpolation between consecutive contour
    vertices; the nearest point is re-chosen in 3D (posed model vs target) every iteration,
    so the correspondence slides along the contour like ICP on a curve.

Method (:func:`fit_sfm_to_landmarks`), ``iterations`` rounds of
    (a) a similarity (Umeyama: scale, rotation, translation) from the frontal model
        landmarks ``F L(alpha, beta)`` (mm) to the targets (crop px);
    (b) the contour correspondences re-chosen, the similarity re-solved;
    (c) a regularised linear least squares for the coefficients with the pose fixed, in crop
        px: ``sum_k ||s R F L_k(alpha, beta) + t - y_k||^2 + lambda_shape ||alpha||^2
        + lambda_expression ||beta||^2`` with ``0 <= beta <= expression_max``
        (normal equations, 69 unknowns; a blendshape weight that leaves its bounds is
        clamped and the rest re-solved).
    A last similarity closes the loop. ``lambda_shape = inf`` keeps the mean identity (the
    "posed mean face"); ``lambda_expression = inf`` the neutral expression.

Everything is vectorised numpy; the per-iteration cost is a few small dense solves.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from vrn.face_models.sfm import SurreyFaceModel, load_sfm, load_sfm_contours
from vrn.geometry.head_pose import similarity_fit

__all__ = [
    "DEFAULT_LAMBDA_EXPRESSION",
    "DEFAULT_LAMBDA_SHAPE",
    "SFMFit",
    "fit_sfm_to_landmarks",
    "sfm_landmark_vertices",
]

#: y flip between the SFM model frame (y up) and the crop frame (y down)
_F = np.diag([1.0, -1.0, 1.0])

#: iBUG 68 contour points, 0-based: subject's right 0..7, left 9..16 (the chin, 8, is mapped)
_CONTOUR_RIGHT_IBUG = np.arange(0, 8)
_CONTOUR_LEFT_IBUG = np.arange(9, 17)

#: chosen on AFLW2000-3D (scripts/compare_fit_targets.py, docs/pipeline.md): weight of
#: ||alpha||^2 (N(0, 1) identity prior) against the squared landmark residuals in crop px
DEFAULT_LAMBDA_SHAPE: float = 30.0
#: weight of ||beta||^2 (blendshape weights, also bounded to [0, expression_max])
DEFAULT_LAMBDA_EXPRESSION: float = 30.0


@dataclass
class SFMFit:
    """An SFM fitted to 68 target landmarks, posed in the targets' frame (crop px).

    Attributes:
        verts: (V, 3) float32 posed mesh, crop px (x right, y down, z toward the camera;
            z has the targets' origin).
        tris: (F, 3) int32 SFM triangles (an oriented manifold with 160 boundary edges).
        R: (3, 3) float64 head rotation in the crop frame, ``posed = s R frontal + t``
            (frontal = ``F v_model``), det +1.
        scale: crop px per model mm.
        t: (3,) float64 translation, crop px.
        landmarks: (68, 3) float32 the fitted model's landmark points, crop px: the mapped
            vertices, the chosen contour points (``contour=True``), NaN where there is no
            correspondence (inner mouth corners 61, 65 (1-based); the contour when
            ``contour=False``) or the target row was NaN.
        shape_coeffs: (63,) float32, N(0, 1) units. expression_coeffs: (6,) float32.
        residual: mean 3D distance (crop px) between ``landmarks`` and the targets over the
            landmarks used.
        used: (68,) bool, the landmarks that took part in the fit.
    """

    verts: np.ndarray
    tris: np.ndarray
    R: np.ndarray
    scale: float
    t: np.ndarray
    landmarks: np.ndarray
    shape_coeffs: np.ndarray
    expression_coeffs: np.ndarray
    residual: float
    used: np.ndarray


def sfm_landmark_vertices(model: SurreyFaceModel) -> np.ndarray:
    """(68,) int SFM vertex id of each iBUG landmark (0-based rows), -1 where not mapped."""
    return np.array([model.landmarks.get(i, -1) for i in range(1, 69)], dtype=np.int64)


@lru_cache(maxsize=4)
def _contour_sides(samples: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Densified contour polylines, right then left side: (P, 2) vertex-id pairs and (P,)
    weights ``w`` (point = (1 - w) v_a + w v_b), P = 16 segments x ``samples`` + 1."""
    w = np.arange(samples, dtype=np.float64) / samples
    out = []
    for ids in load_sfm_contours():
        a = np.asarray(ids, np.int64)
        pairs = np.stack([np.repeat(a[:-1], samples), np.repeat(a[1:], samples)], 1)
        out.append((np.vstack([pairs, [[a[-1], a[-1]]]]), np.concatenate([np.tile(w, len(a) - 1), [0.0]])))
    return tuple(out)


def _umeyama(src: np.ndarray, dst: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Weighted similarity ``dst ~ s R src + t`` (:func:`vrn.geometry.head_pose.similarity_fit`).

    Args:
        src, dst: (K, 3); weights: (K,) >= 0.
    Returns:
        s, R (3, 3), t (3,).
    """
    fit = similarity_fit(src, dst, weights)
    return fit.scale, fit.R, fit.t


def _gather(pairs: np.ndarray, w: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points (K, 3) and their bases (K, 3, P) of ``(1 - w) v_a + w v_b``."""
    w0, w1 = (1.0 - w)[:, None], w[:, None]
    m = w0 * mean[pairs[:, 0]] + w1 * mean[pairs[:, 1]]
    b = w0[:, :, None] * basis[pairs[:, 0]] + w1[:, :, None] * basis[pairs[:, 1]]
    return m, b


_ARRAYS: list[tuple[SurreyFaceModel, np.ndarray, np.ndarray]] = []


def _model_arrays(m: SurreyFaceModel) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean (V, 3) and joint basis (V, 3, S + E) of a model, cached (the cast of the
    (3V, 69) basis costs more than a whole fit)."""
    for mm, mean, basis in _ARRAYS:
        if mm is m:
            return mean, basis
    V = len(m.mean)
    mean = m.mean.astype(np.float64)
    basis = np.concatenate([m.shape_basis, m.expression_basis], 1).astype(np.float64).reshape(V, 3, -1)
    _ARRAYS.insert(0, (m, mean, basis))
    del _ARRAYS[2:]
    return mean, basis


def _skew(v: np.ndarray) -> np.ndarray:
    """(K, 3) -> (K, 3, 3) cross-product matrices, ``skew(v) @ w = v x w``."""
    z = np.zeros(len(v))
    return np.stack(
        [np.stack([z, -v[:, 2], v[:, 1]], 1), np.stack([v[:, 2], z, -v[:, 0]], 1), np.stack([-v[:, 1], v[:, 0], z], 1)],
        1,
    )


def _rodrigues(w: np.ndarray) -> np.ndarray:
    """Rotation vector (3,) -> (3, 3) rotation matrix."""
    th = float(np.linalg.norm(w))
    if th < 1e-12:
        return np.eye(3)
    k = _skew((w / th)[None])[0]
    return np.eye(3) + np.sin(th) * k + (1.0 - np.cos(th)) * (k @ k)


def _bounded_ridge(N: np.ndarray, r: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Minimise ``x^T N x / 2 - r^T x`` (N symmetric positive definite, (P, P)) subject to
    ``lo <= x <= hi``: solve, clamp the worst violators to their bound, re-solve the rest
    (an active set that only grows; at most P rounds, in practice the few bounded terms)."""
    P = len(r)
    x = np.zeros(P)
    fixed = np.zeros(P, bool)
    for _ in range(P + 1):
        f = ~fixed
        x[f] = np.linalg.solve(N[np.ix_(f, f)], r[f] - N[np.ix_(f, fixed)] @ x[fixed])
        bad = f & ((x < lo - 1e-12) | (x > hi + 1e-12))
        if not bad.any():
            break
        x[bad] = np.clip(x[bad], lo[bad], hi[bad])
        fixed |= bad
    return x


def _check_targets(y: np.ndarray, lv: np.ndarray, min_landmarks: int) -> None:
    """Raise ValueError for a wrong shape, too few finite mapped targets, or degenerate ones."""
    if y.shape != (68, 3):
        raise ValueError(f"target landmarks must be (68, 3) crop px, got {y.shape}")
    mapped = np.isfinite(y).all(1) & (lv >= 0)
    if mapped.sum() < min_landmarks:
        raise ValueError(
            f"SFM fit needs at least {min_landmarks} finite landmarks among the {int((lv >= 0).sum())} "
            f"the SFM maps, got {int(mapped.sum())} (NaN or missing landmarks)"
        )
    yc = y[mapped] - y[mapped].mean(0)
    sv = np.linalg.svd(yc, compute_uv=False)
    if sv[1] < 1e-6 * max(sv[0], 1e-12) or sv[0] < 1e-9:
        raise ValueError("SFM fit: the target landmarks are degenerate (all equal or collinear)")


class _LandmarkFit:
    """The state of one fit: targets, correspondences (mapped vertices and the sliding contour)
    and the coefficients; :func:`fit_sfm_to_landmarks` drives it.

    A correspondence is a vertex pair and a weight ``w`` (model point = (1 - w) v_a + w v_b):
    a mapped landmark is the pair (v, v) with w = 0, a contour landmark a point on the
    densified contour polyline.
    """

    def __init__(
        self,
        m: SurreyFaceModel,
        y: np.ndarray,
        lambda_shape: float,
        lambda_expression: float,
        expression_max: float,
        contour: bool,
        contour_weight: float,
        contour_samples: int,
    ) -> None:
        self.m, self.y = m, y
        self.lv = sfm_landmark_vertices(m)
        finite = np.isfinite(y).all(1)
        self.S, self.E = m.shape_basis.shape[1], m.expression_basis.shape[1]
        self.mean, self.basis = _model_arrays(m)
        fix_shape, fix_expr = not np.isfinite(lambda_shape), not np.isfinite(lambda_expression)
        self.free = np.concatenate([np.full(self.S, not fix_shape), np.full(self.E, not fix_expr)])
        self.coeffs = np.zeros(self.S + self.E)
        self.map_idx = np.flatnonzero(finite & (self.lv >= 0))
        self.map_pairs = np.stack([self.lv[self.map_idx], self.lv[self.map_idx]], 1)
        self.map_w = np.zeros(len(self.map_idx))
        self.sides = _contour_sides(int(contour_samples)) if contour else ()
        self.side_ibug = [i[finite[i]] for i in (_CONTOUR_RIGHT_IBUG, _CONTOUR_LEFT_IBUG)] if contour else []
        self.contour_weight = float(contour_weight)
        S, E = self.S, self.E
        self.lam = np.concatenate([np.zeros(7), np.full(S, lambda_shape), np.full(E, lambda_expression)])
        self.unk = np.concatenate([np.ones(7, bool), self.free])  # pose (ds, omega, dt) + free coefficients
        self.lo = np.concatenate([np.full(7 + S, -np.inf), np.zeros(E)])
        self.hi = np.concatenate([np.full(7 + S, np.inf), np.full(E, float(expression_max))])

    def model_points(self, pairs: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model-frame points (K, 3) mm of the correspondences and their basis rows."""
        pm, pb = _gather(pairs, w, self.mean, self.basis)
        return pm + pb @ self.coeffs, pb

    def weights_for(self, ids: np.ndarray) -> np.ndarray:
        return np.where(self.lv[ids] >= 0, 1.0, self.contour_weight)

    def assemble(self, s: float, R: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Landmark ids, vertex pairs and weights with the contour re-chosen for a pose."""
        ids, pairs, ws = [self.map_idx], [self.map_pairs], [self.map_w]
        for (sp, sw), ib in zip(self.sides, self.side_ibug):
            if not len(ib):
                continue
            pts, _ = self.model_points(sp, sw)
            posed = s * (pts @ (R @ _F).T) + t  # (P, 3)
            j = ((self.y[ib][:, None, :] - posed[None, :, :]) ** 2).sum(-1).argmin(1)
            ids.append(ib)
            pairs.append(sp[j])
            ws.append(sw[j])
        return np.concatenate(ids), np.concatenate(pairs), np.concatenate(ws)

    def similarity(self, ids: np.ndarray, pairs: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        pts, _ = self.model_points(pairs, w)
        return _umeyama(pts @ _F, self.y[ids], self.weights_for(ids))

    def gauss_newton(
        self, s: float, R: np.ndarray, t: np.ndarray, ids: np.ndarray, pairs: np.ndarray, ws: np.ndarray
    ) -> tuple[float, np.ndarray, np.ndarray]:
        """One joint Gauss-Newton step in pose and coefficients (updates the coefficients),
        crop px residuals: posed_k = s q_k + t, q_k = R F (pm_k + pb_k c); rotation update
        exp([omega]x) R."""
        S, E = self.S, self.E
        pm, pb = _gather(pairs, ws, self.mean, self.basis)
        RF = R @ _F
        q = (pm + pb @ self.coeffs) @ RF.T  # (K, 3) mm
        K = len(ids)
        J = np.empty((K, 3, 7 + S + E))
        J[:, :, 0] = q
        J[:, :, 1:4] = -s * _skew(q)
        J[:, :, 4:7] = np.eye(3)
        J[:, :, 7:] = s * np.einsum("ij,kjp->kip", RF, pb)
        r = self.y[ids] - (s * q + t)
        sw = np.sqrt(self.weights_for(ids))
        J = (J * sw[:, None, None]).reshape(3 * K, -1)[:, self.unk]
        r = (r * sw[:, None]).reshape(-1)
        x = np.concatenate([np.zeros(7), self.coeffs])[self.unk]
        lu = self.lam[self.unk]
        lo, hi = self.lo[self.unk] - x, self.hi[self.unk] - x
        step = _bounded_ridge(J.T @ J + np.diag(lu), J.T @ r - lu * x, lo, hi)
        self.coeffs[self.free] += step[7:]
        return s + step[0], _rodrigues(step[1:4]) @ R, t + step[4:7]

    def result(self, s: float, R: np.ndarray, t: np.ndarray) -> SFMFit:
        ids, pairs, ws = self.assemble(s, R, t)
        verts = s * ((self.mean + self.basis @ self.coeffs) @ (R @ _F).T) + t
        pts, _ = self.model_points(pairs, ws)
        lm = np.full((68, 3), np.nan)
        lm[ids] = s * (pts @ (R @ _F).T) + t
        used = np.zeros(68, bool)
        used[ids] = True
        return SFMFit(
            verts=verts.astype(np.float32),
            tris=np.asarray(self.m.tris, np.int32),
            R=R,
            scale=float(s),
            t=np.asarray(t, np.float64),
            landmarks=lm.astype(np.float32),
            shape_coeffs=self.coeffs[: self.S].astype(np.float32),
            expression_coeffs=self.coeffs[self.S :].astype(np.float32),
            residual=float(np.linalg.norm(lm[ids] - self.y[ids], axis=1).mean()),
            used=used,
        )


def fit_sfm_to_landmarks(
    target: np.ndarray,
    model: SurreyFaceModel | None = None,
    *,
    lambda_shape: float = DEFAULT_LAMBDA_SHAPE,
    lambda_expression: float = DEFAULT_LAMBDA_EXPRESSION,
    expression_max: float = 1.0,
    iterations: int = 5,
    contour: bool = True,
    contour_weight: float = 1.0,
    contour_samples: int = 4,
    min_landmarks: int = 20,
) -> SFMFit:
    """Fit the SFM (pose, identity, expression) to 68 3D landmarks (module doc).

    Args:
        target: (68, 3) iBUG landmarks, crop px (x right, y down, z toward the camera, any
            z origin, z in x / y units). NaN rows are skipped.
        model: the SFM (default :func:`load_sfm`).
        lambda_shape: weight of ``||alpha||^2`` against the squared residuals (crop px^2);
            ``inf`` = mean identity.
        lambda_expression: weight of ``||beta||^2``; ``inf`` = neutral expression.
        expression_max: upper bound of each blendshape weight (lower bound 0).
        iterations: rounds of pose / correspondence / coefficient updates.
        contour: fit the 16 jaw-contour targets to the SFM model contour (module doc).
        contour_weight: weight of each contour landmark relative to a mapped one.
        contour_samples: points per contour segment of the densified polyline.
        min_landmarks: fewest finite mapped (non-contour) targets accepted.
    Returns:
        :class:`SFMFit`.
    Raises:
        ValueError: wrong shape, fewer than ``min_landmarks`` finite mapped targets, or
            targets without 3D extent (a degenerate similarity).
    """
    m = model or load_sfm()
    y = np.asarray(target, np.float64)
    _check_targets(y, sfm_landmark_vertices(m), min_landmarks)
    prob = _LandmarkFit(m, y, lambda_shape, lambda_expression, expression_max, contour, contour_weight, contour_samples)
    s, R, t = prob.similarity(prob.map_idx, prob.map_pairs, prob.map_w)
    for _ in range(max(1, int(iterations))):
        ids, pairs, ws = prob.assemble(s, R, t)
        s, R, t = prob.similarity(ids, pairs, ws) if not prob.free.any() else prob.gauss_newton(s, R, t, ids, pairs, ws)
    return prob.result(s, R, t)
