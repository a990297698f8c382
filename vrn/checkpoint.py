"""Checkpoint files: find (path or URL, downloaded once), load the network, save a slim copy.

A Lightning checkpoint of :class:`vrn.lit_module.VRNLitModule` stores the model spec in
``hyper_parameters["net"] = {"name": ..., **overrides}`` and the crop / volume layout in
``hyper_parameters["layout"]`` (:meth:`vrn.conventions.VolumeLayout.to_dict`; checkpoints
written before layouts were recorded load with :data:`~vrn.conventions.DEFAULT_LAYOUT`);
the network is rebuilt from the spec with :func:`vrn.models.create_model` (no Hydra).
:func:`save_network` writes a slim file of the same structure (spec + layout + network
weights only). URLs are downloaded once into
``<vrn cache>/checkpoints/`` (``$VRN_CACHE_DIR`` or ``~/.cache/vrn``).

Integrity: torch's checkpoint format is a zip archive with a CRC-32 per entry, which
``torch.load`` never checks. :func:`verify_checkpoint` reads every entry and compares its
CRC; :func:`load_network` and :func:`resolve_checkpoint` call it, so a damaged file is
refused with :class:`CheckpointIntegrityError` (one line naming the file) instead of
loading corrupted weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vrn.assets import cache_dir as vrn_cache_dir
from vrn.assets import resolve as resolve_asset
from vrn.atomic_write import atomic_path
from vrn.conventions import DEFAULT_LAYOUT, LayoutMismatchError, VolumeLayout
from vrn.models import create_model
from vrn.models.torch7_import import is_torch7_file, load_torch7_vrn

log = logging.getLogger(__name__)

__all__ = [
    "resolve_checkpoint",
    "load_network",
    "save_network",
    "layout_for_network",
    "check_network_layout",
    "verify_checkpoint",
    "CheckpointIntegrityError",
    "PRETRAINED_MODELS",
    "DEFAULT_PRETRAINED",
    "PRETRAINED_NETWORKS",
    "is_pretrained_name",
    "pretrained_for_network",
    "pretrained_path",
    "resolve_model_file",
]


#: the project's pretrained models: name -> asset registry name (:mod:`vrn.assets`)
PRETRAINED_MODELS: dict[str, str] = {
    "vrn_medium_guided_aflw": "pretrained/vrn_medium_guided_aflw.ckpt",
    "vrn_medium_aflw": "pretrained/vrn_medium_aflw.ckpt",
}
#: the registered network (:mod:`vrn.models.registry`) of each pretrained model
PRETRAINED_NETWORKS: dict[str, str] = {"vrn_medium_guided_aflw": "vrn_medium_guided", "vrn_medium_aflw": "vrn_medium"}
#: the best model on the AFLW val split (docs/benchmarks.md): what ``ckpt=`` left out and
#: ``Reconstructor.from_pretrained()`` load
DEFAULT_PRETRAINED = "vrn_medium_guided_aflw"


def pretrained_for_network(net_name: str) -> str:
    """The pretrained model whose network is ``net_name`` (what ``model.init_weights=pretrained``
    starts a run of that network from); the default pretrained model when none is."""
    if PRETRAINED_NETWORKS.get(DEFAULT_PRETRAINED) == net_name:
        return DEFAULT_PRETRAINED
    return next((k for k, v in PRETRAINED_NETWORKS.items() if v == net_name), DEFAULT_PRETRAINED)


def pretrained_path(name: str = DEFAULT_PRETRAINED) -> Path:
    """Local path of a pretrained model (shipped in the package, checked by sha256); ``name`` is
    a key of :data:`PRETRAINED_MODELS` or ``"pretrained"`` (the default model).

    Raises:
        ValueError: an unknown name.
    """
    key = DEFAULT_PRETRAINED if name == "pretrained" else name
    if key not in PRETRAINED_MODELS:
        raise ValueError(f"Unknown pretrained model {name!r}; available: pretrained, {', '.join(PRETRAINED_MODELS)}")
    return Path(resolve_asset(PRETRAINED_MODELS[key]))


def is_pretrained_name(name_or_path: str | os.PathLike) -> bool:
    """True for ``"pretrained"`` or a key of :data:`PRETRAINED_MODELS` (a shipped model's name)."""
    s = str(name_or_path)
    return s == "pretrained" or s in PRETRAINED_MODELS


def resolve_model_file(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A pretrained model's name (:func:`pretrained_path`) or a checkpoint path / URL
    (:func:`resolve_checkpoint`, downloads into ``cache_dir``) -> the local file."""
    s = str(name_or_path)
    return pretrained_path(s) if is_pretrained_name(s) else resolve_checkpoint(s, cache_dir)


class CheckpointIntegrityError(ValueError):
    """A checkpoint file whose bytes are damaged (zip CRC mismatch, truncated archive)."""


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check every entry of a torch zip checkpoint against its stored CRC-32.

    Files that are not zip archives (torch's legacy format, Torch7 ``.t7``) are left to
    their loaders.

    Raises:
        CheckpointIntegrityError: an entry's CRC differs or the archive is truncated, naming
            the file and the entry.
    """
    p = Path(path)
    fix = "restore it from a backup or another copy, or retrain / re-download it"
    try:
        if not zipfile.is_zipfile(p):
            with open(p, "rb") as f:  # a truncated zip loses its end record: still "PK\x03\x04" at the start
                if f.read(4) != b"PK\x03\x04":
                    return
            raise CheckpointIntegrityError(f"Checkpoint {p} is damaged (truncated zip archive): {fix}.")
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise CheckpointIntegrityError(f"Checkpoint {p} is damaged ({type(e).__name__}: {e}): {fix}.") from e
    if bad is not None:
        raise CheckpointIntegrityError(f"Checkpoint {p} is damaged (entry '{bad}' fails its CRC check): {fix}.")


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://", "ftp://", "file://"))


def resolve_checkpoint(
    path_or_url: str | os.PathLike, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Local path of a checkpoint: a file as is, a URL downloaded once into the cache.

    Args:
        path_or_url: file path, or an http(s) / ftp / file:// URL.
        cache_dir: download folder (default ``<vrn cache>/checkpoints``).
    Raises:
        FileNotFoundError: a local path that does not exist.
        CheckpointIntegrityError: the file is damaged (:func:`verify_checkpoint`).
    """
    s = str(path_or_url)
    if not _is_url(s):
        p = Path(os.path.expanduser(s))
        if not p.is_file():
            raise FileNotFoundError(
                f"Checkpoint not found: {p}. Pass ckpt=<path to a .ckpt file> "
                f"(e.g. outputs/train/runs/<run>/checkpoints/last.ckpt) or an http(s) URL."
            )
        verify_checkpoint(p)
        return p
    folder = Path(cache_dir) if cache_dir is not None else vrn_cache_dir() / "checkpoints"
    name = os.path.basename(s.split("?")[0].split("#")[0]) or "checkpoint.ckpt"
    dest = folder / f"{hashlib.sha1(s.encode()).hexdigest()[:8]}_{name}"
    if not dest.is_file():
        log.info(f"Downloading checkpoint {s} -> {dest}")
        with atomic_path(dest) as tmp:
            torch.hub.download_url_to_file(s, str(tmp), progress=progress)
    verify_checkpoint(dest)
    return dest


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Network weights from a Lightning ``state_dict`` (``net.`` / compiled ``net._orig_mod.``)
    or from a bare network state dict."""
    keys = list(state)
    if any(k.startswith("net.") for k in keys):
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    return {k.replace("_orig_mod.", "", 1) if k.startswith("_orig_mod.") else k: v for k, v in state.items()}


def load_network(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", weights_only: bool = True
) -> tuple[nn.Module, dict[str, Any], VolumeLayout]:
    """Rebuild the network of a checkpoint from its stored model spec (no Hydra).

    Args:
        path: local checkpoint: a Lightning ``.ckpt`` of :class:`vrn.lit_module.VRNLitModule`
            or a file written by :meth:`Reconstructor.save` (``hyper_parameters["net"]`` +
            ``state_dict``), or a Torch7 ``.t7`` file of the authors' released VRN-unguided
            model (read with torchfile; see :mod:`vrn.models.torch7_import`).
        map_location: where tensors load.
        weights_only: torch's safe unpickler (tensors and plain containers only). Pass False
            only for a checkpoint you trust that holds other objects.
    Returns:
        (network in eval mode, model spec ``{"name": ..., **overrides}``, the crop / volume
        layout the network was trained with; for a checkpoint that records none,
        :data:`~vrn.conventions.DEFAULT_LAYOUT` with the network's depth bins).
    Raises:
        vrn.conventions.LayoutMismatchError: the recorded layout's depth bins differ from the
            network's output channels.
        CheckpointIntegrityError: the file is damaged (:func:`verify_checkpoint`).
    """
    verify_checkpoint(path)
    if is_torch7_file(path):  # the authors' released Torch7 model (vrn-unguided.t7)
        net, spec = load_torch7_vrn(path)
        layout = layout_for_network(net)
        check_network_layout(net, layout, str(path))
        return net.to(map_location).eval(), spec, layout
    try:
        ckpt = torch.load(str(path), map_location=map_location, weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name and a hint
        fix = "pass the .ckpt written by vrn.train, a file of Reconstructor.save, or the released .t7"
        if isinstance(e, pickle.UnpicklingError):
            # torch's own text suggests weights_only=False: wrong advice for a file that is not ours
            why = "not a checkpoint the safe loader accepts (a foreign pickle, or not a torch file at all)"
        else:
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
        raise ValueError(f"Cannot load checkpoint {path}: {why}; {fix}") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a vrn checkpoint (no 'state_dict')")
    hp = ckpt.get("hyper_parameters") or {}
    spec = hp.get("net")
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(
            f"{path} does not store a model spec (hyper_parameters['net'] = {{'name': ...}}); "
            f"was it written by vrn.lit_module.VRNLitModule or Reconstructor.save?"
        )
    spec = dict(spec)
    net = create_model(**spec)
    missing, unexpected = net.load_state_dict(_strip_prefix(ckpt["state_dict"]), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match model {spec}: missing {missing[:5]}..., unexpected {unexpected[:5]}..."
        )
    recorded = hp.get("layout")
    layout = VolumeLayout.from_dict(recorded) if recorded is not None else layout_for_network(net)
    check_network_layout(net, layout, str(path))
    return net.eval(), spec, layout


def layout_for_network(net: nn.Module, layout: VolumeLayout | dict[str, Any] | None = None) -> VolumeLayout:
    """``layout`` as a :class:`~vrn.conventions.VolumeLayout`; None -> :data:`~vrn.conventions.DEFAULT_LAYOUT`
    with the network's output depth bins (``net.depth_bins``, when it has the attribute)."""
    if isinstance(layout, VolumeLayout):
        return layout
    if layout is not None:
        return VolumeLayout.from_dict(layout)
    bins = getattr(net, "depth_bins", None)
    return DEFAULT_LAYOUT if bins is None else replace(DEFAULT_LAYOUT, depth_bins=int(bins))


def check_network_layout(net: nn.Module, layout: VolumeLayout, what: str = "the checkpoint") -> None:
    """Raise :class:`~vrn.conventions.LayoutMismatchError` unless the network's output depth
    bins (``net.depth_bins``, when it has the attribute) equal ``layout.depth_bins``."""
    bins = getattr(net, "depth_bins", None)
    if bins is not None and int(bins) != layout.depth_bins:
        raise LayoutMismatchError(
            f"{what}: the network outputs {bins} depth bins but its layout has depth_bins={layout.depth_bins}"
        )


def save_network(
    path: str | os.PathLike, net: nn.Module, model_spec: dict[str, Any], layout: VolumeLayout = DEFAULT_LAYOUT
) -> Path:
    """A slim checkpoint (model spec + layout + network weights; loads with :func:`load_network`),
    written atomically."""
    if not model_spec:
        raise ValueError("unknown model spec: build the Reconstructor with model_spec=... to save it")
    check_network_layout(net, layout, str(path))
    state = {f"net.{k}": v.detach().cpu() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(
            {"hyper_parameters": {"net": dict(model_spec), "layout": layout.to_dict()}, "state_dict": state}, tmp
        )
    return Path(path)
