"""The activation cache: the contract between harvest, train and evaluate (cache_layout.md)."""
from .layout import CONTENT_ROLES, REGIMES, ROLE_NAMES, SPECIAL_ROLES, CacheError, CacheMeta, Role, hook_name
from .reader import ActivationCache, LayerStats
from .store import RemotePath, StorageConfig, is_remote, parse_location, set_default_storage_options
from .writer import CacheWriter, TokenArrays

__all__ = ["ActivationCache", "CacheError", "CacheMeta", "CacheWriter", "CONTENT_ROLES", "LayerStats", "REGIMES",
           "ROLE_NAMES", "RemotePath", "Role", "SPECIAL_ROLES", "StorageConfig", "TokenArrays", "hook_name",
           "is_remote", "parse_location", "set_default_storage_options"]
