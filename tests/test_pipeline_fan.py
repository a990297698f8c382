"""The face-alignment backend's code path with RANDOM weights of the right architectures.

face-alignment downloads its weights at run time; here a temporary TORCH_HOME holds
random state dicts under the file names of face-alignment's URLs, so the real loading,
detection and landmark code runs offline (outputs are meaningless, shapes are not).
"""

from __future__ import annotations

import inspect
import os
from urllib.parse import urlparse

import numpy as np
import pytest
import torch

face_alignment = pytest.importorskip("face_alignment")


@pytest.fixture(scope="module")
def fake_torch_home(tmp_path_factory):
    from face_alignment.api import models_urls
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.detection.sfd.sfd_detector import models_urls as sfd_urls
    from face_alignment.models import FAN

    home = tmp_path_factory.mktemp("torch_home")
    ckpt = home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(FAN(4).state_dict(), ckpt / os.path.basename(urlparse(models_urls["2DFAN-4"]).path))
    torch.save(s3fd().state_dict(), ckpt / os.path.basename(urlparse(sfd_urls["s3fd"]).path))
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("TORCH_HOME", None)
    else:
        os.environ["TORCH_HOME"] = old


def test_fan_backend_with_random_weights(fake_torch_home, shared_dir):
    from vrn.detectors import get_detector
    from vrn.image_io import read_image_rgb

    det = get_detector("fan")
    det.setup()
    fa = det._m_fa
    if "compile" in inspect.signature(face_alignment.FaceAlignment.__init__).parameters:
        assert not hasattr(fa.face_alignment_net, "_orig_mod")  # compile=False was passed
    assert fa.flip_input is False
    img = read_image_rgb(shared_dir / "data" / "images" / "aflw-test.jpg")
    box = np.array([60.0, 50.0, 160.0, 170.0])
    dets = det.landmarks_for_boxes(img, box[None])
    assert len(dets) == 1
    lm = dets[0].landmarks
    assert lm.shape == (68, 2) and np.isfinite(lm).all()
    # heatmap peaks map back into face-alignment's crop around the box (~1.3x its size)
    c, half = (box[:2] + box[2:]) / 2, 1.3 * (box[2:] - box[:2]).max()
    assert (np.abs(lm - c) <= half).all()


@pytest.mark.slow
def test_fan_backend_full_detect_with_random_weights(fake_torch_home, shared_dir):
    """S3FD on the photo, then FAN on at most max_faces boxes (~10 s per FAN pass on CPU)."""
    from vrn.detectors import get_detector
    from vrn.image_io import read_image_rgb

    det = get_detector("fan", max_faces=1, min_score=0.0)
    img = read_image_rgb(shared_dir / "data" / "images" / "aflw-test.jpg")[::2, ::2].copy()
    found = det.detect(img)
    assert len(found) == 1  # random weights fire everywhere; max_faces keeps one
    assert found[0].landmarks.shape == (68, 2) and found[0].box.shape == (4,)
