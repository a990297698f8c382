"""Asset registry: every model or data file the project loads is resolved here.

Lookup order for an asset ``name`` (e.g. ``"3ddfa_v2/mb05_120x120.pth"``):

1. an explicit path (a config value) -- used as is, must exist;
2. ``$VRN_ASSETS_DIR/<name>`` -- a local mirror (CI and tests point it at ``../shared/assets``;
   several folders may be given, separated by ``os.pathsep``);
3. a mirror beside the checkout, when present: ``<repo>/assets`` or ``<repo>/../shared/assets``;
4. the user cache ``$VRN_CACHE_DIR`` or ``~/.cache/vrn/<name>``;
5. a download from the upstream URL into the cache, verified against the sha256.

Offline with nothing found, :class:`AssetNotFoundError` names the file, the URL and
where to place it by hand. Nothing is ever half-written: downloads go to a temporary
file that is renamed only after the checksum matches.

Integrity. Every file found (1-4) is checked against its registry sha256 the first time a
process uses it; a damaged or truncated copy raises :class:`AssetIntegrityError` naming
the file, the expected hash and where to get a good copy. A verified file leaves a small
stamp in ``<cache>/verified/`` keyed on its path, size and mtime, so later processes skip
the hashing until the file changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vrn.atomic_write import atomic_write, atomic_write_from

__all__ = [
    "Asset",
    "AssetNotFoundError",
    "AssetIntegrityError",
    "REGISTRY",
    "resolve",
    "cache_dir",
    "sha256_of",
    "verify_file",
    "verified_sha256",
]

_3DDFA_V2 = "https://github.com/cleardusk/3DDFA_V2/raw/master/"
_3DDFA_V1 = "https://github.com/cleardusk/3DDFA/raw/master/"
_EOS = "https://github.com/patrikhuber/eos/raw/master/share/"


@dataclass(frozen=True)
class Asset:
    """One registered file: its registry name, upstream URL and expected sha256."""

    name: str
    url: str | None
    sha256: str | None
    description: str = ""
    #: shipped inside the package (``vrn/pretrained/``): found there first, checked by sha256
    bundled: bool = False


class AssetNotFoundError(FileNotFoundError):
    """Raised when an asset is neither present locally nor downloadable."""


class AssetIntegrityError(AssetNotFoundError):
    """A local copy of an asset whose sha256 differs from the registry's (damaged or truncated)."""


def _a(name: str, url: str | None, sha: str | None, desc: str = "") -> Asset:
    return Asset(name, url, sha, desc)


#: sha256 of the shipped unguided pretrained checkpoint (vrn/pretrained/vrn_medium_aflw.ckpt)
PRETRAINED_SHA256 = "2c3051e3d4603bbad8e5ab322feb50779502a9611d923847a2584d3ce1094d60"
#: sha256 of the shipped guided pretrained checkpoint, the default (vrn/pretrained/vrn_medium_guided_aflw.ckpt)
PRETRAINED_GUIDED_SHA256 = "eed7e3e52cebff5e734ed38d9584ce5b6fe588ef3eb3f10db0f77e4dd1dc05fb"
#: where bundled assets live (inside the installed package)
BUNDLED_DIR = Path(__file__).resolve().parent

REGISTRY: dict[str, Asset] = {
    a.name: a
    for a in [
        # --- 3DDFA_V2 (Guo et al., ECCV 2020; MIT code, BFM-derived data) ---
        _a(
            "3ddfa_v2/mb05_120x120.pth",
            _3DDFA_V2 + "weights/mb05_120x120.pth",
            "f93ed7f1c4c0382b16d7c18480a5f67473c1917a47475a9823924f38aeb27280",
            "MobileNetV1 x0.5 3DMM regressor",
        ),
        _a("3ddfa_v2/mb1_120x120.pth", _3DDFA_V2 + "weights/mb1_120x120.pth", None, "MobileNetV1 x1.0 3DMM regressor"),
        _a(
            "3ddfa_v2/FaceBoxesProd.pth",
            _3DDFA_V2 + "FaceBoxes/weights/FaceBoxesProd.pth",
            "c0cb2b1e40710c0aa5fc32a8759b1496a0fe0a126c907ca0ffe35b4bd0709d09",
            "FaceBoxes face detector",
        ),
        _a(
            "3ddfa_v2/param_mean_std_62d_120x120.pkl",
            _3DDFA_V2 + "configs/param_mean_std_62d_120x120.pkl",
            "090d7150f77cb66c29ddae21e4508fbde59123dcd1dea7facc24a7ed06d1c795",
            "regressor output mean/std",
        ),
        _a(
            "3ddfa_v2/tri.pkl",
            _3DDFA_V2 + "configs/tri.pkl",
            "0562a594d8369f7d1c86306522ff76fd3a2c81cf90ba9443893c1191ad0abbb8",
            "triangles of the 38,365-vertex no-neck BFM",
        ),
        _a(
            "3ddfa_v2/indices.npy",
            _3DDFA_V2 + "configs/indices.npy",
            "b341debcdf26492332c1f96ced438e727e74164d1524cab9cca0aedf6ccd39c8",
        ),
        _a(
            "3ddfa_v2/bfm_noneck_v3.pkl",
            _3DDFA_V2 + "configs/bfm_noneck_v3.pkl",
            None,
            "dense 38,365-vertex BFM shape/expression bases",
        ),
        _a(
            "3ddfa_v2/bfm_noneck_v3_offline.npz",
            None,
            "c368000720b0ff6a723d689e9023425d5cdfaa78f4f1442a23bb3c34ab25f21a",
            "offline stand-in for bfm_noneck_v3.pkl (exact mean face and landmarks only); "
            "built from the 3DDFA files, not downloadable: copy it from a vrn assets mirror",
        ),
        # --- 3DDFA v1 (68-point BFM basis) ---
        _a(
            "3ddfa_v1/keypoints_sim.npy",
            _3DDFA_V1 + "train.configs/keypoints_sim.npy",
            "065053f041b03ed32e36641d26fcd9aefef36f6c518899091cdc6038a6246c13",
        ),
        _a(
            "3ddfa_v1/u_shp.npy",
            _3DDFA_V1 + "train.configs/u_shp.npy",
            "8a3b8b5ba3b0526ce3ddd3e287b26e0192c150e477767f374a6e333a365ff7dd",
        ),
        _a(
            "3ddfa_v1/u_exp.npy",
            _3DDFA_V1 + "train.configs/u_exp.npy",
            "69049fb360bfff61090f7705ba510ed9bd817da871edbaa69e2fed7df624cf19",
        ),
        _a(
            "3ddfa_v1/u_base.txt",
            _3DDFA_V1 + "c++/weights/u_base.txt",
            "1ea7c3116070aeee720605a4a44ca9db582ac550095c321c3cf65ec925fe43cf",
        ),
        _a(
            "3ddfa_v1/w_shp_base.txt",
            _3DDFA_V1 + "c++/weights/w_shp_base.txt",
            "bec9a2189eb77c61ff940c801dcd9e5cd7f1973b6d91949494d9cd7ac121b7f6",
        ),
        _a(
            "3ddfa_v1/w_exp_base.txt",
            _3DDFA_V1 + "c++/weights/w_exp_base.txt",
            "4dc637c92c34bfd69faab74cafce23913f2b6181ff00c57a7ab69c1204d20b18",
        ),
        # --- Surrey Face Model via eos (Huber et al., VISAPP 2016; non-commercial) ---
        _a(
            "sfm/sfm_shape_3448.bin",
            _EOS + "sfm_shape_3448.bin",
            "43750338ae533e7fb981e924b6f67ebde3d292f15ec4fc886ae5af14308ad980",
            "Surrey Face Model, 3448 vertices, 63 shape components",
        ),
        _a(
            "sfm/expression_blendshapes_3448.bin",
            _EOS + "expression_blendshapes_3448.bin",
            "a77c81712fc5e8b08a1be4cd2824d51514e5bde6578109ae5240dfb3489efd43",
            "6 expression blendshapes of the SFM",
        ),
        _a(
            "sfm/ibug_to_sfm.txt",
            _EOS + "ibug_to_sfm.txt",
            "810810c457184526c7d54305ecbc5da764e2431b5e66025d921a7d424aebfac9",
            "68 iBUG landmarks -> SFM vertex ids",
        ),
        # --- the project's own pretrained model, shipped in the package (vrn/pretrained/) ---
        Asset(
            "pretrained/vrn_medium_aflw.ckpt",
            None,
            PRETRAINED_SHA256,
            "vrn_medium trained on real AFLW faces: 6,510 steps on CPU (experiment=aflw_real), then "
            "8,689 steps on an H200 (experiment=aflw_real_gpu, 7,600 faces), then 1,000 CPU steps at batch "
            "16 on all 18,040 train faces with a moving average of the weights (callbacks=ema), AFLW val "
            "IoU 0.802; layout source_roi_px=120 (faces resampled through 3DDFA's 120 px ROI, as its "
            "training crops); docs/benchmarks.md",
            bundled=True,
        ),
        Asset(
            "pretrained/vrn_medium_guided_aflw.ckpt",
            None,
            PRETRAINED_GUIDED_SHA256,
            "vrn_medium_guided (VRN-Guided: the crop's 68 landmarks as 9 facial-part heatmaps beside the "
            "image) started from vrn_medium_aflw, 5,889 CPU steps at batch 16 on the 18,040 AFLW train "
            "faces (experiment=aflw_real_guided: bf16, NHWC, lr 3e-4 then 3e-5 from step 4,000, EMA "
            "0.998), then 3,089 steps at lr 3e-5 on a yaw-balanced epoch (experiment=aflw_real_guided_yaw), "
            "then 2,263 steps on the same epoch of flip-averaged targets and guidance (fitter.flip=true; "
            "experiment=aflw_real_guided_flip), then 1,418 steps with the (60, 90] rows drawn 1.5x "
            "(experiment=aflw_real_guided_profile) and 3,920 with them drawn 2x (experiment="
            "aflw_real_guided_profile2); AFLW val IoU 0.931 (948 faces, flip-averaged targets); expects the "
            "flip-averaged landmarks of the tddfa detectors (flip: true, their default); "
            "layout source_roi_px=120; docs/benchmarks.md",
            bundled=True,
        ),
        _a(
            "sfm/sfm_model_contours.json",
            _EOS + "sfm_model_contours.json",
            "c9e69bfa995ab19ac6b27abb07729eb0520a00bb192be12426ca6bce76f3fded",
            "SFM vertex ids of the face outline (jaw contour), right and left",
        ),
    ]
}


def cache_dir() -> Path:
    """The user cache: ``$VRN_CACHE_DIR`` or ``~/.cache/vrn``."""
    return Path(os.environ.get("VRN_CACHE_DIR", Path.home() / ".cache" / "vrn")).expanduser()


def mirror_dirs() -> list[Path]:
    """Local mirrors searched before the cache: $VRN_ASSETS_DIR entries, then beside the checkout."""
    dirs = [Path(d).expanduser() for d in os.environ.get("VRN_ASSETS_DIR", "").split(os.pathsep) if d]
    repo = Path(__file__).resolve().parents[1]
    dirs += [d for d in (repo / "assets", repo.parent / "shared" / "assets") if d.is_dir()]
    return dirs


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _help(asset: Asset, tried: list[Path], reason: str) -> str:
    where = "\n".join(f"  - {p}" for p in tried)
    url = asset.url or "(no public URL: the file is built from upstream files)"
    return (
        f"Asset '{asset.name}' not found ({reason}).\n"
        f"Looked in:\n{where}\n"
        f"Upstream: {url}\n"
        f"Fix: download it by hand and place it at {cache_dir() / asset.name}, "
        f"or set VRN_ASSETS_DIR to a folder that holds '{asset.name}' "
        f"(e.g. VRN_ASSETS_DIR=../shared/assets), or pass an explicit path in the config."
    )


def _download(asset: Asset, dest: Path) -> None:
    def fetch(out: BinaryIO) -> None:
        with urllib.request.urlopen(asset.url, timeout=60) as resp:
            shutil.copyfileobj(resp, out)
        out.flush()
        if asset.sha256 is not None:
            got = sha256_of(out.name)
            if got != asset.sha256:
                raise AssetNotFoundError(
                    f"Checksum mismatch for '{asset.name}' from {asset.url}: "
                    f"expected {asset.sha256}, got {got}. The download was discarded."
                )

    atomic_write_from(dest, fetch)


#: files verified by this process: (path, size, mtime_ns) -> sha256
_VERIFIED: dict[tuple[str, int, int], str] = {}


def _stamp_path(p: Path) -> Path:
    """The verified-stamp file of ``p`` in the user cache (one small JSON per absolute path)."""
    return cache_dir() / "verified" / f"{hashlib.sha1(str(p).encode()).hexdigest()[:20]}.json"


def _where_to_get(asset: Asset) -> str:
    if asset.bundled:
        return "reinstall vrn (pip install --force-reinstall vrn), or pass an explicit checkpoint path"
    src = f"download it again from {asset.url}" if asset.url else "copy it again from a vrn assets mirror"
    return f"{src} into {cache_dir() / asset.name} (or a VRN_ASSETS_DIR folder), replacing the damaged copy"


def verify_file(asset: Asset, path: str | os.PathLike) -> None:
    """Check ``path`` against ``asset.sha256`` (no-op when the registry has no hash).

    Hashes the file once per process and once per (path, size, mtime) across processes (a
    stamp in ``<cache>/verified/``; the stamp is best effort, an unwritable cache only costs
    the hashing).

    Raises:
        AssetIntegrityError: the file's sha256 differs (damaged, truncated or another
            version), naming the file, its size, the expected hash and where to get it.
    """
    if asset.sha256 is None:
        return
    p = Path(path).absolute()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if _VERIFIED.get(key) == asset.sha256:
        return
    stamp = _stamp_path(p)
    want = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": asset.sha256}
    with contextlib.suppress(OSError, ValueError):
        if json.loads(stamp.read_text()) == want:
            _VERIFIED[key] = asset.sha256
            return
    got = sha256_of(p)
    if got != asset.sha256:
        raise AssetIntegrityError(
            f"Asset '{asset.name}' at {p} is damaged or truncated ({st.st_size} bytes, sha256 {got}; expected "
            f"sha256 {asset.sha256}). Fix: {_where_to_get(asset)}."
        )
    _VERIFIED[key] = got
    with contextlib.suppress(OSError):
        atomic_write(stamp, json.dumps(want, sort_keys=True).encode(), fsync=False)


def resolve(name: str, path: str | os.PathLike | None = None, download: bool | None = None) -> Path:
    """Return a local path to the asset ``name``.

    Args:
        name: registry name, e.g. ``"sfm/sfm_shape_3448.bin"``.
        path: explicit path from a config; when given it must exist and wins.
        download: allow a download from upstream (default: unless ``VRN_OFFLINE=1``).

    Raises:
        AssetNotFoundError: naming the file, the URL and where to put it.
        AssetIntegrityError: the file found does not match the registry's sha256.
    """
    if name not in REGISTRY:
        raise KeyError(f"Unknown asset '{name}'. Known: {', '.join(sorted(REGISTRY))}")
    asset = REGISTRY[name]
    tried: list[Path] = []
    if asset.bundled and path is None:
        p = BUNDLED_DIR / name
        tried.append(p)
        if p.is_file():
            verify_file(asset, p)
            return p
    if path is not None:
        p = Path(path).expanduser()
        if p.is_file():
            verify_file(asset, p)
            return p
        raise AssetNotFoundError(_help(asset, [p], "the configured path does not exist"))
    for mirror in mirror_dirs():
        p = mirror / name
        tried.append(p)
        if p.is_file():
            verify_file(asset, p)
            return p
    p = cache_dir() / name
    tried.append(p)
    if p.is_file():
        verify_file(asset, p)
        return p
    if download is None:
        download = os.environ.get("VRN_OFFLINE", "0") not in ("1", "true", "yes")
    if not download or asset.url is None:
        raise AssetNotFoundError(_help(asset, tried, "offline" if asset.url else "not downloadable"))
    try:
        _download(asset, p)
    except AssetNotFoundError:
        raise
    except Exception as e:  # network errors: say what to do
        raise AssetNotFoundError(_help(asset, tried, f"download failed: {e}")) from e
    verify_file(asset, p)  # checked while downloading: records the stamp
    return p


def verified_sha256(name: str) -> str:
    """The sha256 of asset ``name`` as resolved here: the registry's hash once the file is
    verified (computed from the file when the registry has none). Raises like :func:`resolve`."""
    p = resolve(name)
    return REGISTRY[name].sha256 or sha256_of(p)


def available(name: str) -> bool:
    """True when the asset can be resolved without a download (a damaged copy raises
    :class:`AssetIntegrityError`: it is there, but must not be used)."""
    try:
        resolve(name, download=False)
        return True
    except AssetIntegrityError:
        raise
    except AssetNotFoundError:
        return False
