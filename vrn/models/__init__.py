"""VRN models, registered by name."""

from .registry import create_model, list_models, register_model
from .vrn import VRN

__all__ = ["VRN", "create_model", "list_models", "register_model"]
