"""Volumes: the VRN target (voxelisation), its compact code, and volume -> mesh."""

from .codec import VolumeCode, decode, decode_torch, encode, from_bytes, front_depth, to_bytes
from .mesh import export_mesh, volume_to_mesh
from .voxelize import closed_face_mesh, solid_code_from_crossings, voxelize_face

__all__ = ["VolumeCode", "encode", "decode", "decode_torch", "to_bytes", "from_bytes", "front_depth",
           "voxelize_face", "closed_face_mesh", "solid_code_from_crossings", "volume_to_mesh", "export_mesh"]
