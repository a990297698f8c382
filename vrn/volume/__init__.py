"""Volumes: the VRN target (voxelisation), its compact code, and volume -> mesh."""

from vrn.volume.codec import VolumeCode, decode, decode_torch, encode, from_bytes, to_bytes
from vrn.volume.mesh import export_mesh, volume_to_mesh
from vrn.volume.surface import front_depth_of_code
from vrn.volume.voxelize import closed_face_mesh, solid_code_from_crossings, voxelize_face

__all__ = [
    "VolumeCode",
    "encode",
    "decode",
    "decode_torch",
    "to_bytes",
    "from_bytes",
    "front_depth_of_code",
    "voxelize_face",
    "closed_face_mesh",
    "solid_code_from_crossings",
    "volume_to_mesh",
    "export_mesh",
]
