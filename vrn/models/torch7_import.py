"""Import the authors' released Torch7 weights (``vrn-unguided.t7``) into our network.

AaronJackson/vrn's download script fetches ``vrn-unguided.t7``, a Torch7 ``nn`` module
tree built from ``nn.Sequential``, ``nn.ConcatTable``, ``nn.CAddTable``, ``nn.Identity``,
``nn.SpatialConvolution``, ``nn.SpatialBatchNormalization``, ``nn.ReLU``,
``nn.SpatialMaxPooling``, ``nn.SpatialUpSamplingNearest``,
``nn.SpatialUpSamplingBilinear`` and a final ``nn.Sigmoid``. The file is read with the
``torchfile`` package (an optional extra: ``pip install torchfile`` or
``pip install "vrn[t7]"``) and mapped onto ``create_model("vrn_unguided")`` *by
structure*:

1. the Torch7 tree is walked depth first (children in order; the branches of a
   ``ConcatTable`` in branch order) collecting the parameterised layers
   (convolutions and batch norms);
2. our network is walked the same way (``named_modules`` = registration order; the
   blocks register residual body before skip, hourglass upper before lower branch, and
   stem, stages, head in forward order, which is the released order);
3. the two lists are zipped and every pair is checked - layer type (conv vs batch norm),
   every tensor's shape, convolution stride / padding - before its tensors are copied.

Any difference raises :class:`Torch7ImportError` naming the Torch7 layer (index among
parameterised layers, position in the depth-first module listing, child-index path,
class, shape) and ours (module name, class, shape).

The released model ends in a sigmoid; ours returns logits (the sigmoid belongs to the
loss and to inference), so the imported network's ``sigmoid(net(x))`` is the released
model's output.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vrn.models import create_model

log = logging.getLogger(__name__)

__all__ = [
    "T7Layer",
    "Torch7ImportError",
    "collect_torch7_layers",
    "collect_torch_layers",
    "copy_torch7_layers",
    "is_torch7_file",
    "load_torch7_vrn",
    "read_torch7",
]

#: Torch7 class names (last dotted part) of the parameterised layers we map.
_CONV_CLASSES = ("SpatialConvolution", "SpatialConvolutionMM")
_BN_CLASSES = ("SpatialBatchNormalization", "BatchNormalization")

#: Torch7 binary serialisation: type code of a Torch class instance, first reference index.
_T7_TYPE_TORCH = 4


class Torch7ImportError(ValueError):
    """A Torch7 file whose module tree does not match the requested network."""


@dataclass
class T7Layer:
    """One parameterised layer of a Torch7 module tree.

    Attributes:
        index: position among the parameterised layers (0-based, depth-first order).
        position: position in the depth-first listing of all modules below the root
            (0-based; the numbering of a ``print``-style dump of the tree).
        path: child indices from the root, e.g. ``"3.0.0.2"`` = root.modules[3]
            .modules[0].modules[0].modules[2] (0-based).
        typename: the Torch7 class, e.g. ``"nn.SpatialConvolution"``.
        kind: ``"conv"`` or ``"bn"``.
        tensors: ``weight`` (conv: (out, in, kh, kw), or (out, in*kh*kw) in old files;
            BN: (C,)), ``bias`` ((out,) / (C,)), and for BN ``running_mean`` and
            ``running_var`` (or ``running_std`` in old files), each (C,); values as
            stored (numpy or torch), None where the field is absent.
        attrs: scalar fields: conv ``kW kH dW dH padW padH``, BN ``eps``.
    """

    index: int
    position: int
    path: str
    typename: str
    kind: str
    tensors: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        w = self.tensors.get("weight")
        shape = tuple(w.shape) if w is not None else None
        return (
            f"t7 layer #{self.index} ({self.typename}, weight {shape}) at module #{self.position} "
            f"in the depth-first listing, path {self.path or '<root>'}"
        )


# ---- reading --------------------------------------------------------------------------------


def is_torch7_file(path: str | os.PathLike) -> bool:
    """True for a ``.t7`` path, or a file that starts like a binary Torch7 serialised object.

    The magic check reads the first bytes: type code 4 (a Torch class instance), reference
    index 1, then a short version string ``"V <n>"`` or a class name. A PyTorch checkpoint
    (a zip archive or a pickle) never starts that way.
    """
    p = Path(os.fspath(path))
    if p.suffix.lower() == ".t7":
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(32)
    except OSError:
        return False
    if len(head) < 16:
        return False
    type_code, ref_index, n = struct.unpack("<iii", head[:12])
    if type_code != _T7_TYPE_TORCH or ref_index != 1 or not 0 < n <= 64:
        return False
    return head[12 : 12 + n].startswith((b"V ", b"nn.", b"torch.", b"cudnn."))


def read_torch7(path: str | os.PathLike) -> Any:
    """The object stored in a binary Torch7 file, read with ``torchfile``.

    Returns:
        the root object (a ``torchfile.TorchObject`` for a module tree; tensors come back
        as numpy arrays).
    Raises:
        ImportError: ``torchfile`` is not installed.
        Torch7ImportError: the file cannot be parsed.
    """
    try:
        import torchfile  # optional extra: only needed to read .t7 files
    except ImportError as e:
        raise ImportError(
            'Reading a Torch7 .t7 file needs the torchfile package: pip install torchfile (or pip install "vrn[t7]")'
        ) from e
    if struct.calcsize("l") != 8:
        # torchfile reads Torch7 "long"s with the C long of this platform; the released file
        # was written on 64-bit Linux (8-byte longs).
        raise Torch7ImportError(
            f"Cannot read {path}: torchfile needs a platform whose C long has 8 bytes "
            f"(64-bit Linux / macOS); here it has {struct.calcsize('l')}"
        )
    try:
        return torchfile.load(str(path))
    except Exception as e:  # re-raised with the file name
        raise Torch7ImportError(f"Cannot read Torch7 file {path}: {type(e).__name__}: {e}") from e


# ---- walking the Torch7 tree (torchfile-free: duck-typed) ------------------------------------


def _typename(node: Any) -> str | None:
    """Torch class name of a node (``torch_typename()``), None for plain values."""
    get = getattr(node, "torch_typename", None)
    if not callable(get):
        return None
    name = get()
    return name.decode("utf8", "replace") if isinstance(name, bytes) else str(name)


def _field(node: Any, name: str) -> Any:
    """Field ``name`` of a Torch object (str or bytes keys), None when absent."""
    for key in (name, name.encode("utf8")):
        try:
            value = node[key]
        except (KeyError, TypeError, IndexError, AttributeError):  # torchfile fails on absent bytes keys
            continue
        if value is not None:
            return value
    return None


def _children(node: Any) -> list[Any]:
    """The ``modules`` of a container in order (a list, or a Lua table {1: m1, 2: m2, ...})."""
    mods = _field(node, "modules")
    if mods is None:
        return []
    if isinstance(mods, dict):
        return [mods[k] for k in sorted(mods, key=lambda k: int(k))]
    return list(mods)


def _kind(typename: str) -> str | None:
    short = typename.rsplit(".", 1)[-1]
    if short in _CONV_CLASSES:
        return "conv"
    if short in _BN_CLASSES:
        return "bn"
    return None


def _is_empty(value: Any) -> bool:
    return value is None or (hasattr(value, "shape") and int(np.prod(tuple(value.shape))) == 0)


def _walk_t7(node: Any, path: tuple[int, ...], counter: list[int]) -> Iterator[tuple[Any, tuple[int, ...], int]]:
    for i, child in enumerate(_children(node)):
        position = counter[0]
        counter[0] += 1
        yield child, path + (i,), position
        yield from _walk_t7(child, path + (i,), counter)


def collect_torch7_layers(root: Any) -> list[T7Layer]:
    """The parameterised layers of a Torch7 module tree, depth first.

    Works on what ``torchfile`` returns and on any object with ``torch_typename()`` and
    item access to its fields (``node["modules"]``, ``node["weight"]``, ...), so it needs
    no ``torchfile`` itself.

    Raises:
        Torch7ImportError: a module that holds a weight but is neither a convolution nor
            a batch norm (nothing of ours to map it to), or the root is not a Torch object.
    """
    if _typename(root) is None:
        raise Torch7ImportError(f"the Torch7 file does not hold a module (got {type(root).__name__})")
    layers: list[T7Layer] = []
    for node, path, position in _walk_t7(root, (), [0]):
        typename = _typename(node) or type(node).__name__
        kind = _kind(typename)
        path_s = ".".join(map(str, path))
        if kind is None:
            if not _is_empty(_field(node, "weight")):
                raise Torch7ImportError(
                    f"unsupported parameterised Torch7 layer {typename} at module #{position}, "
                    f"path {path_s}: only convolutions and batch norms are mapped"
                )
            continue
        names = (
            ("weight", "bias") if kind == "conv" else ("weight", "bias", "running_mean", "running_var", "running_std")
        )
        attr_names = ("kW", "kH", "dW", "dH", "padW", "padH") if kind == "conv" else ("eps",)
        layers.append(
            T7Layer(
                index=len(layers),
                position=position,
                path=path_s,
                typename=typename,
                kind=kind,
                tensors={k: _field(node, k) for k in names},
                attrs={k: v for k in attr_names if (v := _field(node, k)) is not None},
            )
        )
    return layers


# ---- walking our network -----------------------------------------------------------------------


def collect_torch_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """Our parameterised layers ``(module name, module)`` in registration order (depth first).

    Raises:
        Torch7ImportError: a module with its own parameters that is neither ``Conv2d`` nor
            ``BatchNorm2d``.
    """
    layers: list[tuple[str, nn.Module]] = []
    for name, module in net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
            layers.append((name, module))
        elif any(True for _ in module.parameters(recurse=False)):
            raise Torch7ImportError(
                f"our module {name} ({type(module).__name__}) has parameters but is neither "
                f"Conv2d nor BatchNorm2d; the Torch7 importer cannot map it"
            )
    return layers


# ---- copying ----------------------------------------------------------------------------------------


def _ours(name: str, module: nn.Module) -> str:
    return f"ours {name} ({type(module).__name__}, weight {tuple(module.weight.shape)})"


def _to_tensor(value: Any, like: torch.Tensor) -> torch.Tensor:
    t = value.detach() if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
    return t.to(dtype=like.dtype, device=like.device)


def _pair_error(layer: T7Layer, name: str, module: nn.Module, what: str) -> Torch7ImportError:
    return Torch7ImportError(f"{layer.describe()} does not match {_ours(name, module)}: {what}")


def _matches(layer: T7Layer, module: nn.Module) -> bool:
    """Type and weight shape agree (used to locate the first difference on a count mismatch)."""
    want = "conv" if isinstance(module, nn.Conv2d) else "bn"
    w = layer.tensors.get("weight")
    if layer.kind != want or w is None:
        return False
    shape = tuple(w.shape)
    if want == "conv" and len(shape) == 2:
        return int(np.prod(shape)) == module.weight.numel() and shape[0] == module.weight.shape[0]
    return shape == tuple(module.weight.shape)


def _planned_copies(layer: T7Layer, name: str, module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Check one pair and return (destination, source) tensors; nothing is copied yet."""
    want = "conv" if isinstance(module, nn.Conv2d) else "bn"
    if layer.kind != want:
        raise _pair_error(layer, name, module, f"layer type differs ({layer.kind} in the file, {want} here)")
    src = dict(layer.tensors)
    if want == "bn" and _is_empty(src.get("running_var")) and not _is_empty(src.get("running_std")):
        # Old nn.BatchNormalization files store running_std = 1 / sqrt(var + eps).
        eps = float(layer.attrs.get("eps", module.eps))
        std = np.asarray(src["running_std"], dtype=np.float64)
        src["running_var"] = (1.0 / np.square(std) - eps).astype(np.float32)
    dests: dict[str, torch.Tensor] = {"weight": module.weight, "bias": module.bias}
    if want == "bn":
        dests.update(running_mean=module.running_mean, running_var=module.running_var)
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, dest in dests.items():
        if dest is None:
            raise _pair_error(layer, name, module, f"our layer has no {key}")
        value = src.get(key)
        if _is_empty(value):
            raise _pair_error(layer, name, module, f"the Torch7 layer has no {key} (ours {tuple(dest.shape)})")
        shape = tuple(value.shape)
        # Old SpatialConvolution(MM) files store the weight as (out, in * kh * kw).
        if (
            key == "weight"
            and want == "conv"
            and len(shape) == 2
            and dest.dim() == 4
            and shape[0] == dest.shape[0]
            and int(np.prod(shape)) == dest.numel()
        ):
            value = value.reshape(tuple(dest.shape))  # numpy array or torch tensor
            shape = tuple(dest.shape)
        if shape != tuple(dest.shape):
            raise _pair_error(layer, name, module, f"{key} shape {shape} in the file, {tuple(dest.shape)} here")
        plan.append((dest, _to_tensor(value, dest)))
    if want == "conv":
        kh, kw = module.kernel_size
        sh, sw = module.stride
        ph, pw = module.padding if isinstance(module.padding, tuple) else (None, None)
        ours = {"kW": kw, "kH": kh, "dW": sw, "dH": sh, "padW": pw, "padH": ph}
        for key, value in layer.attrs.items():
            if ours.get(key) is not None and int(value) != int(ours[key]):
                raise _pair_error(layer, name, module, f"{key} = {value} in the file, {ours[key]} here")
    return plan


def copy_torch7_layers(t7_layers: list[T7Layer], net: nn.Module, source: str = "the Torch7 file") -> int:
    """Copy the Torch7 layers' tensors into ``net``'s convolutions and batch norms, in order.

    Every pair is checked (type, every tensor's shape, conv kernel / stride / padding)
    before anything is copied, so a failed import leaves ``net`` untouched. Batch-norm
    ``eps`` is taken from the file when it stores one.

    Returns:
        the number of layers copied.
    Raises:
        Torch7ImportError: a count, type or shape mismatch (the message names both sides).
    """
    ours = collect_torch_layers(net)
    if len(t7_layers) != len(ours):
        n_conv = sum(layer.kind == "conv" for layer in t7_layers)
        our_conv = sum(isinstance(m, nn.Conv2d) for _, m in ours)
        first = next(
            (i for i, (layer, (_, m)) in enumerate(zip(t7_layers, ours)) if not _matches(layer, m)),
            min(len(t7_layers), len(ours)),
        )
        where = (
            f"{t7_layers[first].describe()} vs {_ours(*ours[first])}"
            if first < min(len(t7_layers), len(ours))
            else "one side ends there"
        )
        raise Torch7ImportError(
            f"{source} has {len(t7_layers)} parameterised layers ({n_conv} convolutions, "
            f"{len(t7_layers) - n_conv} batch norms) but the network has {len(ours)} ({our_conv} Conv2d, "
            f"{len(ours) - our_conv} BatchNorm2d); first difference at layer #{first}: {where}"
        )
    plans = [_planned_copies(layer, name, module) for layer, (name, module) in zip(t7_layers, ours)]
    with torch.no_grad():
        for plan in plans:
            for dest, value in plan:
                dest.copy_(value)
    for layer, (_, module) in zip(t7_layers, ours):
        if isinstance(module, nn.BatchNorm2d) and "eps" in layer.attrs:
            module.eps = float(layer.attrs["eps"])
    return len(ours)


def load_torch7_vrn(
    path: str | os.PathLike, model_name: str = "vrn_unguided", **overrides: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``create_model(model_name, **overrides)`` and load a Torch7 ``.t7`` file into it.

    Args:
        path: the released ``vrn-unguided.t7`` (or any Torch7 file of the same layout).
        model_name, overrides: the network to fill (``vrn_unguided`` for the released file).
    Returns:
        (network in eval mode, model spec ``{"name": model_name, **overrides}``), as
        :func:`vrn.checkpoint.load_network` returns. The network maps (B, 3, H, W) RGB in
        [0, 1] to logits (B, depth_bins, H, W); the released model's output is their sigmoid.
    Raises:
        ImportError: ``torchfile`` is not installed.
        Torch7ImportError: the file's layers do not match the network (count, type or shape).
    """
    root = read_torch7(path)
    t7_layers = collect_torch7_layers(root)
    spec = {"name": model_name, **overrides}
    net = create_model(model_name, **overrides)
    n = copy_torch7_layers(t7_layers, net, source=f"Torch7 file {path}")
    log.info(f"Imported {n} layers from Torch7 file {path} into {model_name}")
    return net.eval(), spec
