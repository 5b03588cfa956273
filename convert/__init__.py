"""Reversible MoE checkpoint conversion: the record per model type (`spec`, `registry`, `families/`), mappings
(`mapping`), planner (`plan`), streaming engine."""

from .api import ConvertResult, VerifyResult, ep_ranges, inspect, load_fused_state_dict, merge, split, verify
from .errors import ConvertError, MappingError
from .mapping import ExpertGroup, Layout, MoEMapping, Rename
from .registry import get_mapping, get_spec, registry
from .spec import ModelSpec

__all__ = [
    "ConvertError",
    "ConvertResult",
    "ExpertGroup",
    "Layout",
    "MappingError",
    "ModelSpec",
    "MoEMapping",
    "Rename",
    "VerifyResult",
    "ep_ranges",
    "get_mapping",
    "get_spec",
    "inspect",
    "load_fused_state_dict",
    "merge",
    "registry",
    "split",
    "verify",
]
