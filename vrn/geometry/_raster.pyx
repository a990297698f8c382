# cython: boundscheck=False, wraparound=False, cdivision=True, nonecheck=False, initializedcheck=False
"""Cython kernels: z-buffer rasteriser, per-pixel depth crossings, run filling, boundary edges.

Frames and conventions are those of :mod:`vrn.conventions`: crop px, x right, y down,
z toward the camera; pixel (r, c) has its centre at (x=c, y=r).

Exactness: x and y are snapped to a fixed-point grid of 1/256 px (``SUBPIX``) and every
inside test is done in int64 arithmetic, so the edge function of an edge shared by two
triangles is exactly the negative of itself seen from the other triangle. Together with
the tie rule (a point exactly on an edge belongs to the triangle for which an
infinitesimal shift of the point by (eps^2, eps) lands inside), every pixel centre of a
planar partition is covered by exactly one triangle, vertices included: no gaps, no
double hits. This is what makes the winding-number fill watertight.

Use through the typed wrappers in :mod:`vrn.geometry.raster`. Kernels take C-contiguous
float32 / int32 arrays and validate values themselves (finite vertices with |x|, |y| below
``MAX_ABS_COORD``; triangle indices in range) at the cost of one pass over the data.
"""

import numpy as np
cimport numpy as cnp
from libc.math cimport ceil, floor, fabs, INFINITY
from libc.float cimport DBL_MAX
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.stdint cimport int64_t, int32_t, int8_t, uint8_t

cnp.import_array()

cdef enum:
    SUBPIX_BITS = 8
cdef double SUBPIX = <double>(1 << SUBPIX_BITS)
# a multiple of SUBPIX larger than any |fixed-point coordinate|, to shift non-negative values
cdef int64_t SHIFT_BIAS = (<int64_t>1) << 40
SUBPIX_PER_PX = 1 << SUBPIX_BITS
# |x|, |y| must stay below this (crop px) so that int64 edge functions cannot overflow
# (fixed-point coordinates < 2**28, differences < 2**29, products < 2**58).
cdef double MAX_ABS = <double>(1 << 20)
MAX_ABS_COORD = MAX_ABS


cdef inline bint _tie_ok(int64_t dx, int64_t dy) nogil:
    # A point exactly on the (canonically oriented) edge with direction (dx, dy) is inside
    # iff shifting it by (eps^2, eps) moves it to the inside: sign(dx*eps - dy*eps^2) > 0.
    return dx > 0 or (dx == 0 and dy < 0)


cdef inline int32_t _ifloor(double t) noexcept nogil:
    # floor for |t| < 2**31 without a libm call (baseline x86-64 has no SSE4.1 roundsd)
    cdef int32_t i = <int32_t>t
    if t < i:
        i -= 1
    return i


cdef int _snap(const float[:, ::1] verts, int32_t* X, int32_t* Y) noexcept nogil:
    # fixed point 1/SUBPIX px, round half up; returns 1 on a non-finite or out-of-range vertex
    cdef Py_ssize_t i
    cdef Py_ssize_t n = verts.shape[0]
    cdef double x, y, z
    cdef double lim = MAX_ABS
    for i in range(n):
        x = verts[i, 0]
        y = verts[i, 1]
        z = verts[i, 2]
        if not (fabs(x) < lim and fabs(y) < lim and fabs(z) <= DBL_MAX):
            return 1
        X[i] = _ifloor(x * SUBPIX + 0.5)
        Y[i] = _ifloor(y * SUBPIX + 0.5)
    return 0


cdef int _check_tris(const int32_t[:, ::1] tris, Py_ssize_t V) noexcept nogil:
    # 1 when some index is outside [0, V)
    cdef Py_ssize_t f, k
    cdef Py_ssize_t F = tris.shape[0]
    for f in range(F):
        for k in range(3):
            if tris[f, k] < 0 or tris[f, k] >= V:
                return 1
    return 0


def _raise_bad_input(int code):
    if code == 1:
        raise ValueError(f"verts must be finite with |x|, |y| < {MAX_ABS} px (exact fixed-point range)")
    raise ValueError("tris index out of range [0, V)")


# Per-triangle setup shared by both kernels. Returns 0 when the triangle covers no pixel
# centre of the grid (degenerate in projection, or its box misses every centre).
cdef struct TriSetup:
    int64_t x0, y0, x1, y1, x2, y2
    int64_t area          # |2 * signed area| in SUBPIX^2 units
    int sign              # sign of the signed area = sign of the normal's z
    int64_t dx0, dy0, dx1, dy1, dx2, dy2   # canonical edge directions (edge k opposite vertex k)
    int64_t b0, b1, b2    # tie bias: 0 when points on edge k count as inside, else 1
    Py_ssize_t r0, r1, c0, c1


cdef inline int _setup(TriSetup* t, const int32_t* X, const int32_t* Y, int32_t i0, int32_t i1, int32_t i2,
                       Py_ssize_t H, Py_ssize_t W) noexcept nogil:
    cdef int64_t a
    cdef int64_t xmin, xmax, ymin, ymax
    t.x0 = X[i0]; t.y0 = Y[i0]
    t.x1 = X[i1]; t.y1 = Y[i1]
    t.x2 = X[i2]; t.y2 = Y[i2]
    # pixel-centre box first: most triangles of a dense mesh contain no pixel centre
    xmin = t.x0
    if t.x1 < xmin: xmin = t.x1
    if t.x2 < xmin: xmin = t.x2
    xmax = t.x0
    if t.x1 > xmax: xmax = t.x1
    if t.x2 > xmax: xmax = t.x2
    # ceil / floor division by SUBPIX = 2**SUBPIX_BITS as shifts of non-negative values
    t.c0 = <Py_ssize_t>(((xmin + SHIFT_BIAS - 1) >> SUBPIX_BITS) - (SHIFT_BIAS >> SUBPIX_BITS) + 1)
    t.c1 = <Py_ssize_t>(((xmax + SHIFT_BIAS) >> SUBPIX_BITS) - (SHIFT_BIAS >> SUBPIX_BITS))
    if t.c0 < 0: t.c0 = 0
    if t.c1 > W - 1: t.c1 = W - 1
    if t.c0 > t.c1:
        return 0
    ymin = t.y0
    if t.y1 < ymin: ymin = t.y1
    if t.y2 < ymin: ymin = t.y2
    ymax = t.y0
    if t.y1 > ymax: ymax = t.y1
    if t.y2 > ymax: ymax = t.y2
    t.r0 = <Py_ssize_t>(((ymin + SHIFT_BIAS - 1) >> SUBPIX_BITS) - (SHIFT_BIAS >> SUBPIX_BITS) + 1)
    t.r1 = <Py_ssize_t>(((ymax + SHIFT_BIAS) >> SUBPIX_BITS) - (SHIFT_BIAS >> SUBPIX_BITS))
    if t.r0 < 0: t.r0 = 0
    if t.r1 > H - 1: t.r1 = H - 1
    if t.r0 > t.r1:
        return 0
    a = (t.x1 - t.x0) * (t.y2 - t.y0) - (t.y1 - t.y0) * (t.x2 - t.x0)
    if a == 0:
        return 0
    if a > 0:
        t.sign = 1
        t.area = a
        t.dx0 = t.x2 - t.x1; t.dy0 = t.y2 - t.y1
        t.dx1 = t.x0 - t.x2; t.dy1 = t.y0 - t.y2
        t.dx2 = t.x1 - t.x0; t.dy2 = t.y1 - t.y0
    else:
        t.sign = -1
        t.area = -a
        t.dx0 = t.x1 - t.x2; t.dy0 = t.y1 - t.y2
        t.dx1 = t.x2 - t.x0; t.dy1 = t.y2 - t.y0
        t.dx2 = t.x0 - t.x1; t.dy2 = t.y0 - t.y1
    t.b0 = 0 if _tie_ok(t.dx0, t.dy0) else 1
    t.b1 = 0 if _tie_ok(t.dx1, t.dy1) else 1
    t.b2 = 0 if _tie_ok(t.dx2, t.dy2) else 1
    return 1


def rasterize_kernel(const float[:, ::1] verts, const int32_t[:, ::1] tris, Py_ssize_t H, Py_ssize_t W,
                     bint keep_front):
    """Z-buffer over pixel centres. Returns depth (H,W) f32, tri_id (H,W) i32, bary (H,W,3) f32."""
    cdef Py_ssize_t V = verts.shape[0], F = tris.shape[0]
    depth_np = np.full((H, W), -INFINITY, dtype=np.float32)
    tri_np = np.full((H, W), -1, dtype=np.int32)
    bary_np = np.zeros((H, W, 3), dtype=np.float32)
    cdef float[:, ::1] depth = depth_np
    cdef int32_t[:, ::1] tri_id = tri_np
    cdef float[:, :, ::1] bary = bary_np
    cdef int32_t* X = <int32_t*>malloc(max(V, 1) * sizeof(int32_t))
    cdef int32_t* Y = <int32_t*>malloc(max(V, 1) * sizeof(int32_t))
    cdef int bad = 0
    # the z-buffer keeps the max of sgn*z; empty pixels hold -inf in sgn*z units
    cdef double sgn = 1.0 if keep_front else -1.0
    cdef double* zbuf = <double*>malloc(max(H * W, 1) * sizeof(double))
    cdef Py_ssize_t f, r, c, k
    cdef int32_t i0, i1, i2
    cdef TriSetup t
    cdef int64_t S = 1 << SUBPIX_BITS
    cdef int64_t px, py, e0, e1, e2
    cdef double z0, z1, z2, inv, z
    if X == NULL or Y == NULL or zbuf == NULL:
        free(X); free(Y); free(zbuf)
        raise MemoryError()
    with nogil:
        for k in range(H * W):
            zbuf[k] = -INFINITY
        bad = _snap(verts, X, Y)
        if bad == 0 and _check_tris(tris, V):
            bad = 2
        for f in range(F if bad == 0 else 0):
            i0 = tris[f, 0]; i1 = tris[f, 1]; i2 = tris[f, 2]
            if not _setup(&t, X, Y, i0, i1, i2, H, W):
                continue
            z0 = verts[i0, 2]; z1 = verts[i1, 2]; z2 = verts[i2, 2]
            inv = 1.0 / <double>t.area
            for r in range(t.r0, t.r1 + 1):
                py = r * S
                for c in range(t.c0, t.c1 + 1):
                    px = c * S
                    e0 = t.dx0 * (py - t.y1) - t.dy0 * (px - t.x1)
                    if e0 < t.b0:
                        continue
                    e1 = t.dx1 * (py - t.y2) - t.dy1 * (px - t.x2)
                    if e1 < t.b1:
                        continue
                    e2 = t.dx2 * (py - t.y0) - t.dy2 * (px - t.x0)
                    if e2 < t.b2:
                        continue
                    z = (<double>e0 * z0 + <double>e1 * z1 + <double>e2 * z2) * inv
                    k = r * W + c
                    if sgn * z > zbuf[k]:
                        zbuf[k] = sgn * z
                        depth[r, c] = <float>z
                        tri_id[r, c] = <int32_t>f
                        bary[r, c, 0] = <float>(<double>e0 * inv)
                        bary[r, c, 1] = <float>(<double>e1 * inv)
                        bary[r, c, 2] = <float>(<double>e2 * inv)
    free(X); free(Y); free(zbuf)
    if bad:
        _raise_bad_input(bad)
    return depth_np, tri_np, bary_np


def crossings_kernel(const float[:, ::1] verts, const int32_t[:, ::1] tris, Py_ssize_t H, Py_ssize_t W):
    """All triangle / pixel-centre crossings in CSR order, each pixel's list sorted front to back.

    Returns offsets (H*W+1,) int64, z (N,) float32, facing (N,) int8.
    """
    cdef Py_ssize_t V = verts.shape[0], F = tris.shape[0]
    cdef Py_ssize_t P = H * W
    cdef int32_t* X = <int32_t*>malloc(max(V, 1) * sizeof(int32_t))
    cdef int32_t* Y = <int32_t*>malloc(max(V, 1) * sizeof(int32_t))
    cdef int bad = 0
    cdef Py_ssize_t cap = 4 * P + 1024
    cdef Py_ssize_t n = 0
    cdef int32_t* tpix = <int32_t*>malloc(cap * sizeof(int32_t))
    cdef float* tz = <float*>malloc(cap * sizeof(float))
    cdef int8_t* tf = <int8_t*>malloc(cap * sizeof(int8_t))
    cdef void* tmp
    cdef Py_ssize_t f, r, c, k, j, i, lo, hi
    cdef int32_t i0, i1, i2
    cdef TriSetup t
    cdef int64_t S = 1 << SUBPIX_BITS
    cdef int64_t px, py, e0, e1, e2
    cdef double z0, z1, z2, inv
    cdef bint failed = False
    cdef float zk
    cdef int8_t fk
    if X == NULL or Y == NULL or tpix == NULL or tz == NULL or tf == NULL:
        free(X); free(Y); free(tpix); free(tz); free(tf)
        raise MemoryError()
    offsets_np = np.zeros(P + 1, dtype=np.int64)
    cdef int64_t[::1] offsets = offsets_np
    with nogil:
        bad = _snap(verts, X, Y)
        if bad == 0 and _check_tris(tris, V):
            bad = 2
        for f in range(F if bad == 0 else 0):
            i0 = tris[f, 0]; i1 = tris[f, 1]; i2 = tris[f, 2]
            if not _setup(&t, X, Y, i0, i1, i2, H, W):
                continue
            z0 = verts[i0, 2]; z1 = verts[i1, 2]; z2 = verts[i2, 2]
            inv = 1.0 / <double>t.area
            for r in range(t.r0, t.r1 + 1):
                py = r * S
                for c in range(t.c0, t.c1 + 1):
                    px = c * S
                    e0 = t.dx0 * (py - t.y1) - t.dy0 * (px - t.x1)
                    if e0 < t.b0:
                        continue
                    e1 = t.dx1 * (py - t.y2) - t.dy1 * (px - t.x2)
                    if e1 < t.b1:
                        continue
                    e2 = t.dx2 * (py - t.y0) - t.dy2 * (px - t.x0)
                    if e2 < t.b2:
                        continue
                    if n == cap:
                        cap = 2 * cap
                        tmp = realloc(tpix, cap * sizeof(int32_t))
                        if tmp == NULL:
                            failed = True
                            break
                        tpix = <int32_t*>tmp
                        tmp = realloc(tz, cap * sizeof(float))
                        if tmp == NULL:
                            failed = True
                            break
                        tz = <float*>tmp
                        tmp = realloc(tf, cap * sizeof(int8_t))
                        if tmp == NULL:
                            failed = True
                            break
                        tf = <int8_t*>tmp
                    k = r * W + c
                    tpix[n] = <int32_t>k
                    tz[n] = <float>((<double>e0 * z0 + <double>e1 * z1 + <double>e2 * z2) * inv)
                    tf[n] = <int8_t>t.sign
                    n += 1
                    offsets[k + 1] += 1
                if failed:
                    break
            if failed:
                break
    free(X); free(Y)
    if failed or bad:
        free(tpix); free(tz); free(tf)
        if bad:
            _raise_bad_input(bad)
        raise MemoryError()
    z_np = np.empty(n, dtype=np.float32)
    facing_np = np.empty(n, dtype=np.int8)
    cdef float[::1] zo = z_np
    cdef int8_t[::1] fo = facing_np
    cdef int64_t* fill = <int64_t*>malloc(max(P, 1) * sizeof(int64_t))
    if fill == NULL:
        free(tpix); free(tz); free(tf)
        raise MemoryError()
    with nogil:
        for k in range(P):
            offsets[k + 1] += offsets[k]
            fill[k] = offsets[k]
        for i in range(n):
            k = tpix[i]
            zo[fill[k]] = tz[i]
            fo[fill[k]] = tf[i]
            fill[k] += 1
        # insertion sort each pixel's short list by decreasing z (stable)
        for k in range(P):
            lo = offsets[k]
            hi = offsets[k + 1]
            for i in range(lo + 1, hi):
                zk = zo[i]
                fk = fo[i]
                j = i - 1
                while j >= lo and zo[j] < zk:
                    zo[j + 1] = zo[j]
                    fo[j + 1] = fo[j]
                    j -= 1
                zo[j + 1] = zk
                fo[j + 1] = fk
    free(fill); free(tpix); free(tz); free(tf)
    return offsets_np, z_np, facing_np


def runs_kernel(const int64_t[::1] offsets, const float[::1] z, const int8_t[::1] facing,
                double depth_factor, int depth_bins, bint evenodd):
    """Inside intervals of each pixel's depth column -> occupied depth-bin runs.

    Crossings of each pixel must be sorted by decreasing z. Walking from the camera
    (z = +inf, outside) toward -z, the winding number after a crossing is the sum of the
    facings crossed so far; a point is inside where it is non-zero ("nonzero" rule) or odd
    ("evenodd" rule). An inside interval (z_b, z_t) occupies the bins d with
    z_b < (d + 0.5) / depth_factor < z_t, clipped to [0, depth_bins). Runs that touch after
    quantisation are merged. An interval still open after the last crossing (an open mesh)
    is dropped.

    Returns lo (P,) uint8, hi (P,) uint8 (the lowest-d run; lo == hi == 0 when empty) and
    extra (K, 3) int32 (pixel, lo, hi) of the further runs, sorted by pixel then lo.
    """
    cdef Py_ssize_t P = offsets.shape[0] - 1
    lo_np = np.zeros(P, dtype=np.uint8)
    hi_np = np.zeros(P, dtype=np.uint8)
    cdef uint8_t[::1] lo = lo_np
    cdef uint8_t[::1] hi = hi_np
    cdef Py_ssize_t cap = 1024, n = 0
    cdef int32_t* ex = <int32_t*>malloc(cap * 3 * sizeof(int32_t))
    cdef void* tmp
    # per-pixel scratch of runs in front-to-back order (at most one run per crossing pair)
    cdef Py_ssize_t scap = 64
    cdef int32_t* slo = <int32_t*>malloc(scap * sizeof(int32_t))
    cdef int32_t* shi = <int32_t*>malloc(scap * sizeof(int32_t))
    cdef Py_ssize_t k, i, a, b, m, j
    cdef int w, w_new
    cdef bint inside, now_inside, failed = False
    cdef double ztop = 0.0, fz, cz
    cdef int32_t dlo, dhi
    if ex == NULL or slo == NULL or shi == NULL:
        free(ex); free(slo); free(shi)
        raise MemoryError()
    with nogil:
        for k in range(P):
            a = offsets[k]
            b = offsets[k + 1]
            if b - a < 2:
                continue
            if b - a > scap:
                scap = b - a
                tmp = realloc(slo, scap * sizeof(int32_t))
                if tmp == NULL:
                    failed = True
                    break
                slo = <int32_t*>tmp
                tmp = realloc(shi, scap * sizeof(int32_t))
                if tmp == NULL:
                    failed = True
                    break
                shi = <int32_t*>tmp
            m = 0
            w = 0
            inside = False
            for i in range(a, b):
                w_new = w + facing[i]
                if evenodd:
                    w_new = w_new & 1
                now_inside = w_new != 0
                if now_inside and not inside:
                    ztop = z[i]
                elif inside and not now_inside:
                    # voxels with z[i] < (d+0.5)/F < ztop
                    # (clamped in double first: no int overflow for far-away z)
                    fz = floor(depth_factor * z[i] - 0.5) + 1.0
                    cz = ceil(depth_factor * ztop - 0.5)
                    dlo = 0 if fz < 0.0 else (depth_bins if fz > depth_bins else <int32_t>fz)
                    dhi = 0 if cz < 0.0 else (depth_bins if cz > depth_bins else <int32_t>cz)
                    if dhi > dlo:
                        if m > 0 and dhi >= slo[m - 1]:
                            # touches / overlaps the previous (higher) run: merge
                            slo[m - 1] = dlo if dlo < slo[m - 1] else slo[m - 1]
                        else:
                            slo[m] = dlo
                            shi[m] = dhi
                            m += 1
                inside = now_inside
                w = w_new
            if m == 0:
                continue
            # runs were produced high d first; the last one is the lowest
            lo[k] = <uint8_t>slo[m - 1]
            hi[k] = <uint8_t>shi[m - 1]
            for j in range(m - 2, -1, -1):
                if n == cap:
                    cap = 2 * cap
                    tmp = realloc(ex, cap * 3 * sizeof(int32_t))
                    if tmp == NULL:
                        failed = True
                        break
                    ex = <int32_t*>tmp
                ex[3 * n] = <int32_t>k
                ex[3 * n + 1] = slo[j]
                ex[3 * n + 2] = shi[j]
                n += 1
            if failed:
                break
    free(slo); free(shi)
    if failed:
        free(ex)
        raise MemoryError()
    extra_np = np.empty((n, 3), dtype=np.int32)
    cdef int32_t[:, ::1] eo = extra_np
    for i in range(n):
        eo[i, 0] = ex[3 * i]
        eo[i, 1] = ex[3 * i + 1]
        eo[i, 2] = ex[3 * i + 2]
    free(ex)
    return lo_np, hi_np, extra_np


cdef inline void _bucket_add(int32_t a, int32_t b, int32_t* fillp, int32_t* code) noexcept nogil:
    # store the edge in the bucket of its smaller endpoint as (other << 1) | (a is the smaller)
    if a < b:
        code[fillp[a]] = (b << 1) | 1
        fillp[a] += 1
    else:
        code[fillp[b]] = a << 1
        fillp[b] += 1


cdef Py_ssize_t _boundary_edges(const int32_t* T, Py_ssize_t F, Py_ssize_t V, int32_t* outb) noexcept nogil:
    # Edges used by exactly one triangle, written as directed pairs (a, b) into outb
    # (capacity 6F int32). Returns the count, or -1 when scratch allocation fails.
    # Counting sort of the 3F edges on their smaller endpoint, then per-bucket multiplicity
    # counts in a (V,) scratch array. Indices must be in [0, V).
    cdef Py_ssize_t E = 3 * F
    cdef Py_ssize_t f, v, i, s, e, n = 0
    cdef int32_t a, b, c, o
    cdef int32_t* start = <int32_t*>calloc(V + 1, sizeof(int32_t))
    cdef int32_t* fillp = <int32_t*>malloc((V + 1) * sizeof(int32_t))
    cdef int32_t* code = <int32_t*>malloc((E + 1) * sizeof(int32_t))
    cdef int32_t* cnt = <int32_t*>calloc(V + 1, sizeof(int32_t))
    if start == NULL or fillp == NULL or code == NULL or cnt == NULL:
        free(start); free(fillp); free(code); free(cnt)
        return -1
    for f in range(F):
        a = T[3 * f]; b = T[3 * f + 1]; c = T[3 * f + 2]
        start[(a if a < b else b) + 1] += 1
        start[(b if b < c else c) + 1] += 1
        start[(c if c < a else a) + 1] += 1
    for v in range(V):
        start[v + 1] += start[v]
    for v in range(V + 1):
        fillp[v] = start[v]
    for f in range(F):
        a = T[3 * f]; b = T[3 * f + 1]; c = T[3 * f + 2]
        _bucket_add(a, b, fillp, code)
        _bucket_add(b, c, fillp, code)
        _bucket_add(c, a, fillp, code)
    for v in range(V):
        s = start[v]
        e = start[v + 1]
        for i in range(s, e):
            cnt[code[i] >> 1] += 1
        for i in range(s, e):
            o = code[i] >> 1
            if cnt[o] == 1:
                if code[i] & 1:
                    outb[2 * n] = <int32_t>v
                    outb[2 * n + 1] = o
                else:
                    outb[2 * n] = o
                    outb[2 * n + 1] = <int32_t>v
                n += 1
        for i in range(s, e):
            cnt[code[i] >> 1] = 0
    free(start); free(fillp); free(code); free(cnt)
    return n


def boundary_edges_kernel(const int32_t[:, ::1] tris, Py_ssize_t V):
    """Edges used by exactly one triangle, directed as in that triangle: (E, 2) int32.

    Order: by the smaller vertex index, then by first appearance.
    """
    cdef Py_ssize_t F = tris.shape[0]
    cdef Py_ssize_t n = 0, i
    cdef int bad = 0
    if F == 0:
        return np.zeros((0, 2), dtype=np.int32)
    if 3 * F >= (1 << 30) or V >= (1 << 30):
        raise ValueError("mesh too large")
    cdef int32_t* outb = <int32_t*>malloc(6 * F * sizeof(int32_t))
    if outb == NULL:
        raise MemoryError()
    with nogil:
        bad = _check_tris(tris, V)
        if not bad:
            n = _boundary_edges(&tris[0, 0], F, V, outb)
    if bad or n < 0:
        free(outb)
        if bad:
            _raise_bad_input(2)
        raise MemoryError()
    out_np = np.empty((n, 2), dtype=np.int32)
    cdef int32_t[:, ::1] out = out_np
    for i in range(n):
        out[i, 0] = outb[2 * i]
        out[i, 1] = outb[2 * i + 1]
    free(outb)
    return out_np


def close_surface_kernel(const float[:, ::1] verts, const int32_t[:, ::1] tris, const int32_t[:, ::1] edges,
                         double ax, double ay, double az, double offset):
    """Close an open surface: surface + copy flattened along -a onto the plane
    a.p = min(a.p_i) - offset (reversed winding) + two wall triangles per boundary edge.

    ``edges`` (E, 2) are the surface's boundary edges, directed as in their triangle (see
    :func:`boundary_edges_kernel`); ``a`` must be a unit vector.
    Returns verts (2V, 3) float32, tris (2F + 2E, 3) int32.
    """
    cdef Py_ssize_t V = verts.shape[0], F = tris.shape[0], n = edges.shape[0]
    cdef Py_ssize_t i
    cdef int bad = 0
    cdef double dmin = INFINITY, d, sh
    cdef int32_t ea, eb
    cdef int32_t Vi = <int32_t>V
    if 3 * F >= (1 << 30) or 2 * V >= (1 << 30):
        raise ValueError("mesh too large")
    if edges.shape[1] != 2:
        raise ValueError("edges must be (E, 2)")
    cdef double* dep = <double*>malloc(max(V, 1) * sizeof(double))
    if dep == NULL:
        raise MemoryError()
    v2_np = np.empty((2 * V, 3), dtype=np.float32)
    t2_np = np.empty((2 * F + 2 * n, 3), dtype=np.int32)
    cdef float[:, ::1] v2 = v2_np
    cdef int32_t[:, ::1] t2 = t2_np
    with nogil:
        bad = _check_tris(tris, V)
        for i in range(n):
            if edges[i, 0] < 0 or edges[i, 0] >= V or edges[i, 1] < 0 or edges[i, 1] >= V:
                bad = 2
        for i in range(V if not bad else 0):
            d = ax * verts[i, 0] + ay * verts[i, 1] + az * verts[i, 2]
            dep[i] = d
            if d < dmin:
                dmin = d
        for i in range(V if not bad else 0):
            sh = dep[i] - dmin + offset
            v2[i, 0] = verts[i, 0]
            v2[i, 1] = verts[i, 1]
            v2[i, 2] = verts[i, 2]
            # exact x / y when a has no component along them (frontal pose): same rays
            v2[V + i, 0] = verts[i, 0] if ax == 0.0 else <float>(verts[i, 0] - sh * ax)
            v2[V + i, 1] = verts[i, 1] if ay == 0.0 else <float>(verts[i, 1] - sh * ay)
            v2[V + i, 2] = <float>(verts[i, 2] - sh * az)
        for i in range(F if not bad else 0):
            t2[i, 0] = tris[i, 0]
            t2[i, 1] = tris[i, 1]
            t2[i, 2] = tris[i, 2]
            t2[F + i, 0] = tris[i, 2] + Vi
            t2[F + i, 1] = tris[i, 1] + Vi
            t2[F + i, 2] = tris[i, 0] + Vi
        for i in range(n if not bad else 0):
            # boundary edge a -> b (as in its triangle): walls b, a, a' and b, a', b'
            ea = edges[i, 0]
            eb = edges[i, 1]
            t2[2 * F + 2 * i, 0] = eb
            t2[2 * F + 2 * i, 1] = ea
            t2[2 * F + 2 * i, 2] = ea + Vi
            t2[2 * F + 2 * i + 1, 0] = eb
            t2[2 * F + 2 * i + 1, 1] = ea + Vi
            t2[2 * F + 2 * i + 1, 2] = eb + Vi
    free(dep)
    if bad:
        _raise_bad_input(2)
    return v2_np, t2_np
