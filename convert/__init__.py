"""Reversible MoE checkpoint conversion: mappings (`mapping`, `families/`), planner (`plan`), streaming engine."""

from .api import ConvertResult, VerifyResult, ep_ranges, inspect, load_fused_state_dict, merge, split, verify
from .errors import ConvertError, MappingError
from .mapping import ExpertGroup, Layout, MoEMapping, Rename
from .registry import get_mapping, registry

__all__ = [
    "ConvertError",
    "ConvertResult",
    "ExpertGroup",
    "Layout",
    "MappingError",
    "MoEMapping",
    "Rename",
    "VerifyResult",
    "ep_ranges",
    "get_mapping",
    "inspect",
    "load_fused_state_dict",
    "merge",
    "registry",
    "split",
    "verify",
]
