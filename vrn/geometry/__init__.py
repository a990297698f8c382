"""Geometry: exact z-buffer rasteriser / depth crossings (Cython) and rigid / crop transforms."""

from vrn.geometry.raster import Raster, boundary_edges, depth_crossings, rasterize
from vrn.geometry.transforms import CropTransform, euler_to_matrix, similarity_2d

__all__ = [
    "Raster",
    "rasterize",
    "depth_crossings",
    "boundary_edges",
    "CropTransform",
    "euler_to_matrix",
    "similarity_2d",
]
