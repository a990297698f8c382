"""vrn: volumetric regression network for 3D face reconstruction."""
