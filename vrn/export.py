"""VRN checkpoint -> ONNX, and ONNX files run with onnxruntime.

::

    python -m vrn.export ckpt=CKPT format=onnx out=model.onnx [opset=17] [check=true]   # conf/export.yaml

The exported graph: input ``crops`` (B, 3, S, S) float32 RGB in [0, 1] (S = the layout's
``crop_size``, B dynamic) -> output ``prob`` (B, D, S, S) float32 occupancy probabilities
(the sigmoid is part of the graph), index ``[b, d, r, c]`` in crop px (:mod:`vrn.conventions`).
A guided network (:mod:`vrn.models.guidance`) has a second input, ``landmarks`` (B, 68, 2)
float32 each crop's landmarks in crop px (x, y); the heatmap rendering is part of the graph.
The model spec and the :class:`~vrn.conventions.VolumeLayout` travel in the file's
``metadata_props`` (:data:`META_SPEC`, :data:`META_LAYOUT`), so
``Reconstructor.from_checkpoint("model.onnx")`` rebuilds the same reconstructor without torch
weights. Exporting needs the ``onnx`` package and running needs ``onnxruntime``
(``pip install "vrn[onnx]"``); both are imported only when used.

Export notes: the TorchScript exporter (``dynamo=False``) traces the network at the crop size;
the bilinear head's interpolation matrices (:class:`~vrn.models.blocks.SeparableBilinearUpsample`)
are fixed for that size and go into the graph as constants (traced as they are, they become
1-D ``Resize`` nodes that onnxruntime's CPU provider does not implement).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from vrn.atomic_write import atomic_write
from vrn.checkpoint import is_pretrained_name, load_network, resolve_model_file
from vrn.cli_errors import UserError, run_cli
from vrn.conventions import VolumeLayout
from vrn.face_models.landmarks68 import N_LANDMARKS
from vrn.models.blocks import SeparableBilinearUpsample

log = logging.getLogger(__name__)

__all__ = [
    "EXPORT_FORMATS",
    "INPUT_NAME",
    "LANDMARKS_NAME",
    "OUTPUT_NAME",
    "META_SPEC",
    "META_LAYOUT",
    "META_FORMAT",
    "OnnxNetwork",
    "is_onnx_file",
    "onnx_bytes",
    "export_onnx",
    "export_checkpoint",
    "compare_backends",
    "example_landmarks",
]

EXPORT_FORMATS = ("onnx",)
INPUT_NAME = "crops"
#: the second input of a guided network's graph: (B, 68, 2) float32 crop px
LANDMARKS_NAME = "landmarks"
OUTPUT_NAME = "prob"
#: metadata_props keys: the model spec (JSON), the layout (JSON), the file format tag
META_SPEC = "vrn.model_spec"
META_LAYOUT = "vrn.layout"
META_FORMAT = "vrn.format"
FORMAT_TAG = "vrn-onnx-1"
DEFAULT_OPSET = 17
_INSTALL = 'pip install "vrn[onnx]"'


def _import(name: str) -> Any:
    """The optional package ``name`` (onnx, onnxruntime), or one line saying how to install it."""
    try:
        if name == "onnx":
            import onnx

            return onnx
        import onnxruntime

        return onnxruntime
    except ImportError as e:
        raise ImportError(f"the ONNX backend needs the '{name}' package: {_INSTALL}") from e


class _ProbNet(nn.Module):
    """The network followed by the sigmoid: crops (B, 3, S, S) [+ landmarks (B, 68, 2) crop px
    for a guided network] -> probabilities (B, D, S, S)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.net(x) if landmarks is None else self.net(x, landmarks))


def example_landmarks(n: int, crop_size: int) -> torch.Tensor:
    """(n, 68, 2) float32 points spread over the crop's middle (a trace input and check input;
    any finite values give the same graph)."""
    g = torch.Generator().manual_seed(0)
    return crop_size * (0.25 + 0.5 * torch.rand(n, N_LANDMARKS, 2, generator=g))


@contextlib.contextmanager
def _fixed_upsample(net: nn.Module, crop_size: int, extra: tuple[torch.Tensor, ...] = ()) -> Iterator[None]:
    """While exporting: each SeparableBilinearUpsample returns its matrices for ``crop_size`` as
    constants (computed by one forward pass of a zero crop; ``extra``: the network's further
    inputs, a guided network's landmarks)."""
    with torch.no_grad():
        net(torch.zeros(1, 3, crop_size, crop_size), *extra)
    patched = []
    try:
        for m in net.modules():
            if isinstance(m, SeparableBilinearUpsample):
                key = next(k for k in m._cache if k[2:4] == (crop_size, crop_size) and k[5] == torch.float32)
                mats = m._cache[key]
                m._mats = lambda *_a, mats=mats: mats  # instance attribute: shadows the method
                patched.append(m)
        yield
    finally:
        for m in patched:
            del m._mats


def onnx_bytes(
    net: nn.Module, layout: VolumeLayout, model_spec: dict[str, Any] | None = None, opset: int = DEFAULT_OPSET
) -> bytes:
    """The network as an ONNX model (sigmoid included), with the spec and layout as metadata.

    Args:
        net: a VRN (logits (B, D, S, S)); on the CPU (a copy is exported, ``net`` is left as is).
        layout: its crop / volume layout; ``layout.crop_size`` is the input size.
        model_spec: ``{"name": ..., **overrides}`` (``Reconstructor.from_checkpoint`` needs it
            only for ``save``; stored as given, {} when None).
        opset: ONNX opset.
    Returns:
        the serialised ``ModelProto``; a guided network's has the second input
        :data:`LANDMARKS_NAME`.
    """
    onnx = _import("onnx")
    training = net.training
    net = net.to("cpu").eval()
    s = layout.crop_size
    guided = bool(getattr(net, "needs_landmarks", False))
    args: tuple[torch.Tensor, ...] = (torch.zeros(1, 3, s, s),)
    names = [INPUT_NAME]
    if guided:
        args, names = (*args, example_landmarks(1, s)), [INPUT_NAME, LANDMARKS_NAME]
    buf = io.BytesIO()
    try:
        with _fixed_upsample(net, s, args[1:]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings: the crop size is fixed on purpose
            torch.onnx.export(
                _ProbNet(net).eval(),
                args,
                buf,
                dynamo=False,
                input_names=names,
                output_names=[OUTPUT_NAME],
                dynamic_axes={**{k: {0: "batch"} for k in names}, OUTPUT_NAME: {0: "batch"}},
                opset_version=int(opset),
                do_constant_folding=True,
            )
    finally:
        net.train(training)  # the exporter switches modes; leave the caller's as it was
    model = onnx.load_from_string(buf.getvalue())
    meta = {
        META_FORMAT: FORMAT_TAG,
        META_SPEC: json.dumps(dict(model_spec or {})),
        META_LAYOUT: json.dumps(layout.to_dict()),
    }
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    model.producer_name = "vrn.export"
    return model.SerializeToString()


def export_onnx(
    path: str | os.PathLike,
    net: nn.Module,
    layout: VolumeLayout,
    model_spec: dict[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write :func:`onnx_bytes` to ``path`` atomically. Returns ``path``."""
    return atomic_write(Path(path), onnx_bytes(net, layout, model_spec, opset))


def export_checkpoint(
    ckpt: str | os.PathLike, out: str | os.PathLike, opset: int = DEFAULT_OPSET, weights_only: bool = True
) -> Path:
    """A checkpoint (``.ckpt`` of vrn.train, ``Reconstructor.save``, the released ``.t7``; path,
    URL, or a shipped model's name such as ``pretrained``) -> ``out`` (.onnx) with its spec and layout."""
    net, spec, layout = load_network(resolve_model_file(ckpt), "cpu", weights_only=weights_only)
    return export_onnx(out, net, layout, spec, opset)


def is_onnx_file(path: str | os.PathLike) -> bool:
    """True for a path ending in ``.onnx``."""
    return str(path).lower().endswith(".onnx")


def _providers(ort: Any, device: str) -> list[Any]:
    dev = torch.device(device)
    if dev.type == "cpu":
        return ["CPUExecutionProvider"]
    if dev.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(
                f"device={device} with backend=onnxruntime needs onnxruntime's CUDA provider "
                f"(pip install onnxruntime-gpu instead of onnxruntime), or use device=cpu"
            )
        return [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]
    raise ValueError(f"device={device}: backend=onnxruntime runs on cpu or cuda")


def _float32(a: np.ndarray | torch.Tensor) -> np.ndarray:
    x = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return np.ascontiguousarray(x, dtype=np.float32)


class OnnxNetwork:
    """A VRN exported by :func:`onnx_bytes`, run with onnxruntime.

    Args:
        model: a ``.onnx`` path or the model's bytes.
        device: "cpu" or "cuda[:N]" (the latter needs onnxruntime-gpu).
        threads: onnxruntime intra-op threads (0: torch's current thread count).

    Attributes:
        model_spec: the spec stored at export ({} if none).
        layout: the :class:`~vrn.conventions.VolumeLayout` stored at export.
        depth_bins: ``layout.depth_bins`` (the output channels).

    Raises:
        ImportError: onnxruntime is not installed (one line: how to install it).
        ValueError: the file was not written by :mod:`vrn.export` (no layout metadata).
    """

    def __init__(self, model: str | os.PathLike | bytes, device: str = "cpu", threads: int = 0) -> None:
        ort = _import("onnxruntime")
        what = "the ONNX model" if isinstance(model, bytes) else str(model)
        src = model if isinstance(model, bytes) else str(model)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads) or torch.get_num_threads()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(src, opts, providers=_providers(ort, device))
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types; re-raised in one line
            if isinstance(e, (RuntimeError, ValueError)) and "backend=onnxruntime" in str(e):
                raise
            raise ValueError(
                f"{what} is not a loadable ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                f"write one with `python -m vrn.export ckpt=... out=model.onnx`"
            ) from e
        meta = self.session.get_modelmeta().custom_metadata_map
        if META_LAYOUT not in meta:
            raise ValueError(
                f"{what} has no vrn layout metadata ('{META_LAYOUT}'): export it with "
                f"`python -m vrn.export ckpt=... out=model.onnx`"
            )
        self.layout = VolumeLayout.from_dict(json.loads(meta[META_LAYOUT]))
        self.model_spec: dict[str, Any] = json.loads(meta.get(META_SPEC, "{}"))
        self.depth_bins = self.layout.depth_bins
        self.device = str(device)
        #: True for a guided network's graph (second input :data:`LANDMARKS_NAME`)
        self.needs_landmarks = LANDMARKS_NAME in {i.name for i in self.session.get_inputs()}

    def __call__(
        self, crops: np.ndarray | torch.Tensor, landmarks: np.ndarray | torch.Tensor | None = None
    ) -> np.ndarray:
        """(B, 3, S, S) float32 crops in [0, 1] [+ (B, 68, 2) crop px landmarks, guided graphs
        only] -> (B, D, S, S) float32 probabilities."""
        feeds = {INPUT_NAME: _float32(crops)}
        if self.needs_landmarks:
            if landmarks is None:
                raise ValueError(
                    f"this ONNX model ({self.model_spec.get('name', 'guided')}) is guided: pass each crop's 68 "
                    f"landmarks (B, {N_LANDMARKS}, 2) crop px beside the crops"
                )
            feeds[LANDMARKS_NAME] = _float32(landmarks)[..., :2]
        return self.session.run([OUTPUT_NAME], feeds)[0]

    def __repr__(self) -> str:
        return f"OnnxNetwork(model={self.model_spec.get('name')}, device={self.device})"


def compare_backends(
    net: nn.Module,
    onnx_net: OnnxNetwork,
    crops: np.ndarray | torch.Tensor,
    landmarks: np.ndarray | torch.Tensor | None = None,
) -> dict[str, float]:
    """Torch vs onnxruntime probabilities on the same crops.

    Args:
        net: the torch network (logits); run in eval mode, float32, on the CPU.
        onnx_net: its export.
        crops: (B, 3, S, S) float32 in [0, 1].
        landmarks: (B, 68, 2) float32 crop px, for a guided network.
    Returns:
        ``max_abs``: max |p_torch - p_ort|; ``flip_fraction``: fraction of voxels whose
        occupancy at 0.5 differs; ``voxels``: voxels compared.
    """
    x = torch.as_tensor(np.asarray(crops, np.float32))
    marks = None if landmarks is None else torch.as_tensor(np.asarray(landmarks, np.float32))
    extra = () if marks is None else (marks,)
    training = net.training
    net.eval()
    with torch.inference_mode():
        p_torch = torch.sigmoid(net.cpu()(x, *extra).float()).numpy()
    net.train(training)
    p_ort = onnx_net(x.numpy(), None if marks is None else marks.numpy())
    return {
        "max_abs": float(np.abs(p_torch - p_ort).max()),
        "flip_fraction": float(np.mean((p_torch > 0.5) != (p_ort > 0.5))),
        "voxels": float(p_torch.size),
    }


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------


def run_export(cfg: DictConfig) -> Path:
    """``conf/export.yaml``: export ``ckpt`` to ``out`` (default: the checkpoint's name with
    ``.onnx``), then, with ``check``, compare onnxruntime with torch on random crops."""
    fmt = str(cfg.get("format", "onnx")).lower()
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"format={fmt} is not supported; choose from {list(EXPORT_FORMATS)}")
    ckpt = cfg.get("ckpt")
    if not ckpt:
        raise UserError("ckpt= is required: the .ckpt (or .t7, or URL) to export")
    path = resolve_model_file(str(ckpt))  # a path, a URL, or a shipped model's name ("pretrained")
    named = is_pretrained_name(ckpt)
    default_out = path.with_suffix(".onnx").name if named else Path(str(ckpt).split("?")[0]).with_suffix(".onnx").name
    out = Path(str(cfg.get("out") or default_out))
    if out.suffix.lower() != ".onnx":
        raise UserError(f"out={out} must end in .onnx")
    net, spec, layout = load_network(path, "cpu")
    export_onnx(out, net, layout, spec, int(cfg.get("opset", DEFAULT_OPSET)))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB; model {spec.get('name')}, layout {layout.to_dict()})")
    if cfg.get("check", True):
        n = int(cfg.get("check_batch", 2))
        crops = torch.rand(n, 3, layout.crop_size, layout.crop_size, generator=torch.Generator().manual_seed(0))
        marks = example_landmarks(n, layout.crop_size) if getattr(net, "needs_landmarks", False) else None
        d = compare_backends(net, OnnxNetwork(out), crops, marks)
        print(
            f"check on {n} random crop(s): max |p_torch - p_ort| = {d['max_abs']:.2e}, "
            f"occupancy (p > 0.5) differs at {d['flip_fraction']:.2e} of {int(d['voxels'])} voxels"
        )
    return out


def _run_export_cli(cfg: DictConfig) -> Path:
    try:
        return run_export(cfg)
    except ImportError as e:  # onnx / onnxruntime missing: one line with the install command
        raise UserError(str(e)) from e


@hydra.main(version_base="1.3", config_path="../conf", config_name="export.yaml")
def main(cfg: DictConfig) -> None:
    run_cli("vrn.export", lambda: _run_export_cli(cfg))


if __name__ == "__main__":
    main()
