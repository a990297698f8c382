"""Torch7 import: a minimal Torch7 binary writer, a file with the released VRN layout, round trips.

The writer below produces the binary format ``torch.save`` writes on 64-bit Linux
(little endian; int = 4 bytes, long = 8 bytes, numbers as doubles): every value starts
with a type code; tables and Torch objects carry a reference index (an object written
twice is stored once, then referenced); a Torch object is a version string ``"V 1"``, its
class name, then its fields as a table (modules) or its own payload (tensors: sizes,
strides, 1-based storage offset, storage; storages: size and raw data).

The tree written is the layout of the released ``vrn-unguided.t7`` (AaronJackson/vrn),
as dumped from the real file with torchfile: a residual is
``Sequential{ConcatTable{Sequential(BN,ReLU,conv1x1,BN,ReLU,conv3x3,BN,ReLU,conv1x1),
Identity | Sequential{conv1x1}}, CAddTable}``; an hourglass level is ``[ConcatTable{upper,
lower}, CAddTable]`` followed by a residual (nested levels sit in the upper branch inside
their own Sequential); a stack is a top-level ``ConcatTable{Identity, Sequential{level,
residual, [conv, BN, ReLU] x 2}}, CAddTable``; the head is a top-level
``ConcatTable{Sequential{Sequential(conv, BN, ReLU), conv, SpatialUpSamplingBilinear,
Sigmoid}}``. All weights and biases are views into one flat storage, as Torch7's
``getParameters()`` leaves them.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchfile
from torch import nn

import vrn.checkpoint
from vrn.models import create_model
from vrn.models.blocks import Bottleneck, ConvBnRelu
from vrn.models.hourglass import VRNHourglass
from vrn.models.torch7_import import (
    Torch7ImportError,
    collect_torch7_layers,
    collect_torch_layers,
    is_torch7_file,
    load_torch7_vrn,
)

# ---- a minimal Torch7 binary writer ----------------------------------------------------------------

T7_NIL, T7_NUMBER, T7_STRING, T7_TABLE, T7_TORCH, T7_BOOLEAN = 0, 1, 2, 3, 4, 5


class T7Object:
    """An instance of a Torch class (e.g. ``nn.SpatialConvolution``): class name + fields."""

    def __init__(self, typename: str, fields: dict[str, Any] | None = None) -> None:
        self.typename = typename
        self.fields = dict(fields or {})

    # the duck-typed interface of vrn.models.torch7_import's walker
    def torch_typename(self) -> str:
        return self.typename

    def __getitem__(self, key: str | bytes) -> Any:
        return self.fields.get(key.decode() if isinstance(key, bytes) else key)


class FloatStorage:
    """``torch.FloatStorage``: grows by :meth:`add` (chunks) until it is written."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.size = 0

    def add(self, array: np.ndarray) -> int:
        """Append ``array`` (flattened, float32); returns its 0-based offset."""
        offset = self.size
        self.chunks.append(np.ascontiguousarray(array, dtype=np.float32).ravel())
        self.size += self.chunks[-1].size
        return offset

    def data(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)


class FloatTensor:
    """``torch.FloatTensor``: a contiguous view of ``size`` into a storage at a 0-based offset."""

    def __init__(self, storage: FloatStorage | None, offset: int, size: tuple[int, ...]) -> None:
        self.storage, self.offset, self.size = storage, offset, tuple(size)
        strides, step = [], 1
        for s in reversed(self.size):
            strides.append(step)
            step *= s
        self.stride = tuple(reversed(strides))

    @classmethod
    def of(cls, array: np.ndarray, storage: FloatStorage | None = None) -> FloatTensor:
        storage = storage if storage is not None else FloatStorage()
        return cls(storage, storage.add(array), array.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.size


class T7Writer:
    """Writes Python values in Torch7's binary serialisation (see the module docstring)."""

    def __init__(self, f) -> None:
        self.f = f
        self.refs: dict[int, int] = {}
        self.alive: list[Any] = []  # keeps written objects alive so their ids stay unique

    def _int(self, v: int) -> None:
        self.f.write(struct.pack("<i", int(v)))

    def _long(self, v: int) -> None:
        self.f.write(struct.pack("<q", int(v)))

    def _raw_string(self, s: str | bytes) -> None:
        b = s.encode() if isinstance(s, str) else s
        self._int(len(b))
        self.f.write(b)

    def _reference(self, type_code: int, obj: Any) -> bool:
        """Type code + reference index; True when ``obj`` was written before (nothing more follows)."""
        self._int(type_code)
        if id(obj) in self.refs:
            self._int(self.refs[id(obj)])
            return True
        self.refs[id(obj)] = len(self.refs) + 1
        self.alive.append(obj)
        self._int(self.refs[id(obj)])
        return False

    def _torch_header(self, obj: Any, class_name: str) -> bool:
        if self._reference(T7_TORCH, obj):
            return True
        self._raw_string("V 1")
        self._raw_string(class_name)
        return False

    def write(self, obj: Any) -> None:
        if obj is None:
            self._int(T7_NIL)
        elif isinstance(obj, bool):
            self._int(T7_BOOLEAN)
            self._int(1 if obj else 0)
        elif isinstance(obj, (int, float)):
            self._int(T7_NUMBER)
            self.f.write(struct.pack("<d", float(obj)))
        elif isinstance(obj, (str, bytes)):
            self._int(T7_STRING)
            self._raw_string(obj)
        elif isinstance(obj, (dict, list)):
            if self._reference(T7_TABLE, obj):
                return
            items = list(obj.items()) if isinstance(obj, dict) else [(i + 1, v) for i, v in enumerate(obj)]
            self._int(len(items))
            for k, v in items:
                self.write(k)
                self.write(v)
        elif isinstance(obj, FloatStorage):
            if self._torch_header(obj, "torch.FloatStorage"):
                return
            data = obj.data()
            self._long(data.size)
            self.f.write(data.astype("<f4").tobytes())
        elif isinstance(obj, FloatTensor):
            if self._torch_header(obj, "torch.FloatTensor"):
                return
            self._int(len(obj.size))
            for s in obj.size:
                self._long(s)
            for s in obj.stride:
                self._long(s)
            self._long(obj.offset + 1)  # Torch7 storage offsets are 1-based
            self.write(obj.storage if obj.size else None)
        elif isinstance(obj, T7Object):
            if self._torch_header(obj, obj.typename):
                return
            self.write(dict(obj.fields))  # the fields: a table of its own
        else:
            raise TypeError(f"cannot write {type(obj).__name__}")


def write_t7(path: Path, obj: Any) -> Path:
    with open(path, "wb") as f:
        T7Writer(f).write(obj)
    return path


# ---- the released layout, built from one of our networks ---------------------------------------------


class ReleasedLayout:
    """Builds the released Torch7 module tree from a :class:`vrn.models.VRN` (its tensors copied).

    Args:
        flat_conv_weights: store convolution weights 2-D (out, in*kh*kw), as old files do.
    """

    def __init__(self, flat_conv_weights: bool = False) -> None:
        self.params = FloatStorage()  # weights and biases: one flat storage (getParameters())
        self.empty = FloatTensor(None, 0, ())  # shared output / gradInput placeholder (a reference)
        self.flat = flat_conv_weights

    def module(self, typename: str, **fields: Any) -> T7Object:
        return T7Object(
            typename, dict(output=self.empty, gradInput=self.empty, train=False, _type="torch.FloatTensor", **fields)
        )

    def seq(self, *mods: T7Object) -> T7Object:
        return self.module("nn.Sequential", modules=list(mods))

    def concat(self, *mods: T7Object) -> T7Object:
        return self.module("nn.ConcatTable", modules=list(mods))

    def conv(self, m: nn.Conv2d) -> T7Object:
        w = m.weight.detach().numpy()
        if self.flat:
            w = w.reshape(w.shape[0], -1)
        return self.module(
            "nn.SpatialConvolution",
            weight=FloatTensor.of(w, self.params),
            bias=FloatTensor.of(m.bias.detach().numpy(), self.params),
            nInputPlane=m.in_channels,
            nOutputPlane=m.out_channels,
            kW=m.kernel_size[1],
            kH=m.kernel_size[0],
            dW=m.stride[1],
            dH=m.stride[0],
            padW=m.padding[1],
            padH=m.padding[0],
        )

    def bn(self, m: nn.BatchNorm2d) -> T7Object:
        return self.module(
            "nn.SpatialBatchNormalization",
            weight=FloatTensor.of(m.weight.detach().numpy(), self.params),
            bias=FloatTensor.of(m.bias.detach().numpy(), self.params),
            running_mean=FloatTensor.of(m.running_mean.numpy()),
            running_var=FloatTensor.of(m.running_var.numpy()),
            eps=m.eps,
            momentum=m.momentum,
            affine=True,
        )

    def relu(self) -> T7Object:
        return self.module("nn.ReLU", inplace=True, threshold=0, val=0)

    def residual(self, b: Bottleneck) -> T7Object:
        body = [
            self.bn(m) if isinstance(m, nn.BatchNorm2d) else self.conv(m) if isinstance(m, nn.Conv2d) else self.relu()
            for m in b.body
        ]
        skip = self.module("nn.Identity") if isinstance(b.skip, nn.Identity) else self.seq(self.conv(b.skip))
        return self.seq(self.concat(self.seq(*body), skip), self.module("nn.CAddTable", inplace=True))

    def cbr(self, s: ConvBnRelu) -> T7Object:
        return self.seq(self.conv(s[0]), self.bn(s[1]), self.relu())

    def branch(self, mods: list[nn.Module]) -> list[T7Object]:
        """A sequence of our modules; a nested hourglass takes the residual after it into its Sequential."""
        out, i = [], 0
        while i < len(mods):
            m = mods[i]
            if isinstance(m, VRNHourglass):
                out.append(self.seq(*self.level(m), self.residual(mods[i + 1])))
                i += 2
                continue
            if isinstance(m, Bottleneck):
                out.append(self.residual(m))
            elif isinstance(m, nn.MaxPool2d):
                out.append(self.module("nn.SpatialMaxPooling", kW=2, kH=2, dW=2, dH=2, padW=0, padH=0, ceil_mode=False))
            elif isinstance(m, nn.Upsample):
                out.append(self.module("nn.SpatialUpSamplingNearest", scale_factor=2))
            else:
                raise TypeError(f"unexpected module {type(m).__name__}")
            i += 1
        return out

    def level(self, hg: VRNHourglass) -> list[T7Object]:
        upper = self.seq(*self.branch(list(hg.upper)))
        lower = self.seq(*self.branch(list(hg.lower)))
        return [self.concat(upper, lower), self.module("nn.CAddTable", inplace=False)]

    def network(self, net: nn.Module) -> T7Object:
        s = net.stem
        mods = [
            self.conv(s[0]),
            self.bn(s[1]),
            self.relu(),
            self.residual(s[3]),
            self.module("nn.SpatialMaxPooling", kW=2, kH=2, dW=2, dH=2, padW=0, padH=0, ceil_mode=False),
            self.residual(s[5]),
            self.residual(s[6]),
        ]
        for stage in net.stages:
            body = self.seq(*self.level(stage[0]), self.residual(stage[1]), self.cbr(stage[2]), self.cbr(stage[3]))
            mods += [self.concat(self.module("nn.Identity"), body), self.module("nn.CAddTable", inplace=False)]
        head = self.seq(
            self.cbr(net.head[0]),
            self.conv(net.head[1]),
            self.module("nn.SpatialUpSamplingBilinear", scale_factor=4),
            self.module("nn.Sigmoid"),
        )
        mods.append(self.concat(head))
        return self.seq(*mods)


def randomized(name: str, seed: int = 0) -> nn.Module:
    """A network with every parameter and BN statistic random (defaults would hide swaps)."""
    torch.manual_seed(seed)
    net = create_model(name)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.05)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


# ---- a reference forward pass of a Torch7 tree (what Torch7 would compute) ---------------------------


def _t(v: Any) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))


def run_t7(node: Any, x: Any) -> Any:
    """Forward ``x`` through a torchfile-loaded module tree with Torch7's semantics."""
    name = node.torch_typename().decode()
    kind = name.split(".", 1)[1]
    if kind == "Sequential":
        for child in node[b"modules"]:
            x = run_t7(child, x)
        return x
    if kind == "ConcatTable":
        return [run_t7(child, x) for child in node[b"modules"]]
    if kind == "CAddTable":
        return sum(x[1:], x[0])
    if kind == "Identity":
        return x
    if kind == "SpatialConvolution":
        w = _t(node[b"weight"])
        w = w.reshape(int(node[b"nOutputPlane"]), int(node[b"nInputPlane"]), int(node[b"kH"]), int(node[b"kW"]))
        return F.conv2d(
            x, w, _t(node[b"bias"]), stride=(node[b"dH"], node[b"dW"]), padding=(node[b"padH"], node[b"padW"])
        )
    if kind == "SpatialBatchNormalization":
        return F.batch_norm(
            x,
            _t(node[b"running_mean"]),
            _t(node[b"running_var"]),
            _t(node[b"weight"]),
            _t(node[b"bias"]),
            False,
            0.0,
            float(node[b"eps"]),
        )
    if kind == "ReLU":
        return F.relu(x)
    if kind == "SpatialMaxPooling":
        return F.max_pool2d(x, (node[b"kH"], node[b"kW"]), (node[b"dH"], node[b"dW"]))
    if kind == "SpatialUpSamplingNearest":
        return F.interpolate(x, scale_factor=int(node[b"scale_factor"]), mode="nearest")
    if kind == "SpatialUpSamplingBilinear":  # Torch7's bilinear aligns corners
        return F.interpolate(x, scale_factor=int(node[b"scale_factor"]), mode="bilinear", align_corners=True)
    if kind == "Sigmoid":
        return torch.sigmoid(x)
    raise NotImplementedError(name)


# ---- tests --------------------------------------------------------------------------------------------


def _assert_same_network(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for (na, ma), (_nb, mb) in zip(collect_torch_layers(a), collect_torch_layers(b)):
        if isinstance(ma, nn.BatchNorm2d):
            assert ma.eps == mb.eps, na


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _round_trip(tmp_path: Path, name: str, size: int, flat: bool = False, batch: int = 2) -> None:
    src = randomized(name)
    path = write_t7(tmp_path / f"{name}.t7", ReleasedLayout(flat_conv_weights=flat).network(src))
    net, spec = load_torch7_vrn(path, model_name=name)
    assert spec == {"name": name}
    assert not net.training
    _assert_same_network(src, net)
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_src, y_net = src(x), net(x)
    assert torch.equal(y_src, y_net)
    # the released graph itself (Torch7 semantics, weights as torchfile reads them) ends in a sigmoid
    with torch.no_grad():
        (y_t7,) = run_t7(torchfile.load(str(path)), x)
    torch.testing.assert_close(torch.sigmoid(y_net), y_t7, atol=1e-5, rtol=0)


def test_writer_reads_back_with_torchfile(tmp_path):
    src = randomized("vrn_tiny")
    path = write_t7(tmp_path / "tiny.t7", ReleasedLayout().network(src))
    root = torchfile.load(str(path))
    assert root.torch_typename() == b"nn.Sequential"
    first = root[b"modules"][0]
    assert first.torch_typename() == b"nn.SpatialConvolution"
    np.testing.assert_array_equal(first[b"weight"], src.stem[0].weight.detach().numpy())
    assert (first[b"kW"], first[b"dW"], first[b"padW"]) == (7, 2, 3)
    bn = root[b"modules"][1]
    np.testing.assert_array_equal(bn[b"running_var"], src.stem[1].running_var.numpy())
    assert bn[b"eps"] == pytest.approx(1e-5) and bn[b"train"] is False
    # weights are views of one shared storage (read once); output tensors are one referenced object
    w, b = first[b"weight"], first[b"bias"]
    assert _address(w) + w.nbytes == _address(b) and _address(b) + b.nbytes == _address(bn[b"weight"])
    assert first[b"output"] is bn[b"output"]
    assert root[b"modules"][-1].torch_typename() == b"nn.ConcatTable"
    assert is_torch7_file(path)


def test_round_trip_vrn_tiny(tmp_path):
    _round_trip(tmp_path, "vrn_tiny", 32)


def test_round_trip_old_2d_conv_weights(tmp_path):
    _round_trip(tmp_path, "vrn_tiny", 32, flat=True)


def test_round_trip_vrn_unguided(tmp_path):
    """The full released graph (19.2 M parameters, about 7 s on 2 idle CPU cores)."""
    _round_trip(tmp_path, "vrn_unguided", 64, batch=1)


def test_released_layout_matches_dump_of_real_file():
    """Anchors from a listing of the real vrn-unguided.t7 (depth-first, root excluded, 0-based):
    1339 modules; stacks at #48 and #689, head ConcatTable at #1330, last conv (200, 256, 1, 1) at #1336."""
    tree = ReleasedLayout().network(create_model("vrn_unguided"))
    listing: list[T7Object] = []

    def walk(node: T7Object) -> None:
        for child in node.fields.get("modules", []):
            listing.append(child)
            walk(child)

    walk(tree)
    assert len(listing) == 1339
    assert [listing[i].typename for i in (0, 1, 2, 3, 18, 31, 48, 49, 688, 689, 1329, 1330, 1337, 1338)] == [
        "nn.SpatialConvolution",
        "nn.SpatialBatchNormalization",
        "nn.ReLU",
        "nn.Sequential",
        "nn.SpatialMaxPooling",
        "nn.Identity",
        "nn.ConcatTable",
        "nn.Identity",
        "nn.CAddTable",
        "nn.ConcatTable",
        "nn.CAddTable",
        "nn.ConcatTable",
        "nn.SpatialUpSamplingBilinear",
        "nn.Sigmoid",
    ]
    assert listing[1336]["weight"].shape == (200, 256, 1, 1)
    assert listing[16]["weight"].shape == (128, 64, 1, 1)  # the stem's first conv skip
    layers = collect_torch7_layers(tree)
    assert layers[-1].position == 1336 and layers[0].path == "0"
    assert len(layers) == len(collect_torch_layers(create_model("vrn_unguided")))


def test_shape_mismatch_names_the_layer(tmp_path):
    src = randomized("vrn_tiny")
    layout = ReleasedLayout()
    tree = layout.network(src)
    layers = collect_torch7_layers(tree)
    ours = collect_torch_layers(src)
    k = next(i for i, layer in enumerate(layers) if layer.kind == "conv" and layer.tensors["weight"].shape[-1] == 3)
    # find the T7Object of layer k and give its weight one more input channel
    node = tree
    for i in map(int, layers[k].path.split(".")):
        node = node["modules"][i]
    w = src.get_submodule(ours[k][0]).weight.detach().numpy()
    node.fields["weight"] = FloatTensor.of(np.zeros((w.shape[0], w.shape[1] + 1, 3, 3), np.float32))
    path = write_t7(tmp_path / "bad_shape.t7", tree)
    with pytest.raises(Torch7ImportError) as err:
        load_torch7_vrn(path, model_name="vrn_tiny")
    msg = str(err.value)
    assert f"t7 layer #{k} " in msg and f"path {layers[k].path}" in msg and "nn.SpatialConvolution" in msg
    assert ours[k][0] in msg and str(tuple(w.shape)) in msg and str((w.shape[0], w.shape[1] + 1, 3, 3)) in msg


def test_type_mismatch_is_an_error(tmp_path):
    src = randomized("vrn_tiny")
    tree = ReleasedLayout().network(src)
    tree["modules"][1].typename = "nn.SpatialConvolution"  # the stem BN posing as a conv
    with pytest.raises(Torch7ImportError, match=r"t7 layer #1 .*stem\.1 .*layer type differs"):
        load_torch7_vrn(write_t7(tmp_path / "bad_type.t7", tree), model_name="vrn_tiny")


def test_missing_layer_names_the_counts(tmp_path):
    src = randomized("vrn_tiny")
    tree = ReleasedLayout().network(src)
    n = len(collect_torch7_layers(tree))
    del tree["modules"][-1]["modules"][0]["modules"][0]["modules"][1]  # the head's batch norm
    with pytest.raises(Torch7ImportError, match=rf"has {n - 1} parameterised layers .* network has {n} "):
        load_torch7_vrn(write_t7(tmp_path / "missing.t7", tree), model_name="vrn_tiny")


def test_wrong_model_for_the_file(tmp_path):
    path = write_t7(tmp_path / "tiny.t7", ReleasedLayout().network(randomized("vrn_tiny")))
    with pytest.raises(Torch7ImportError, match="parameterised layers"):
        load_torch7_vrn(path, model_name="vrn_small")


def test_is_torch7_file(tmp_path):
    tree = ReleasedLayout().network(randomized("vrn_tiny"))
    renamed = write_t7(tmp_path / "weights.bin", tree)
    assert is_torch7_file(renamed)
    assert is_torch7_file(tmp_path / "not_there.t7")
    ckpt = tmp_path / "net.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    assert not is_torch7_file(ckpt)
    assert not is_torch7_file(tmp_path / "not_there.ckpt")


@pytest.mark.skipif(
    not hasattr(vrn.checkpoint, "is_torch7_file"),
    reason="vrn/checkpoint.py does not route .t7 files to the Torch7 importer yet",
)
def test_reconstructor_from_t7_checkpoint(tmp_path):
    from vrn.inference import Reconstructor

    src = randomized("vrn_unguided")
    path = write_t7(tmp_path / "vrn-unguided.t7", ReleasedLayout().network(src))
    rec = Reconstructor.from_checkpoint(path, detector=None)
    assert rec.model_spec == {"name": "vrn_unguided"}
    _assert_same_network(src, rec.net)
    again = Reconstructor.from_checkpoint(rec.save(tmp_path / "imported.ckpt"), detector=None)
    _assert_same_network(src, again.net)
