"""Weight interop: timm state dicts in and out, local checkpoint loading."""
from vitlab.interop.timm import load_timm_weights, register_timm_converter, to_timm_state_dict

__all__ = ["load_timm_weights", "to_timm_state_dict", "register_timm_converter"]
