"""VRN models, registered by name."""

from vrn.models.registry import create_model, list_models, register_model
from vrn.models.vrn import VRN

__all__ = ["VRN", "create_model", "list_models", "register_model"]
