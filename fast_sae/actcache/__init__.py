"""The on-disk activation cache: the contract between harvest, train and evaluate (cache_layout.md)."""
from .layout import CONTENT_ROLES, REGIMES, ROLE_NAMES, SPECIAL_ROLES, CacheError, CacheMeta, Role, hook_name
from .reader import ActivationCache, LayerStats
from .writer import CacheWriter, TokenArrays

__all__ = ["ActivationCache", "CacheError", "CacheMeta", "CacheWriter", "CONTENT_ROLES", "LayerStats", "REGIMES",
           "ROLE_NAMES", "Role", "SPECIAL_ROLES", "TokenArrays", "hook_name"]
