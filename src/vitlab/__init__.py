"""vitlab: vision transformers from interchangeable parts; train, analyse and benchmark them."""
from vitlab.registry import create_model, is_model, list_models, register_model

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "is_model", "register_model", "__version__"]
