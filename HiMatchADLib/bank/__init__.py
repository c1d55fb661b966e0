"""Layer 4, ``bank``: the normal bank (features of every normal slice), built once and cached.

- :mod:`.store`: :class:`NormalBank`, :class:`BankSettings`, checksummed arrays, loading and verification;
- :mod:`.build`: :func:`build_or_load` (keyed by folder contents, model and settings), stale temporaries;
- :mod:`.clusters`: seeded spherical k-means and shared codebooks.
"""

from .build import bank_key, build_or_load, scan_normals
from .store import BANK_FORMAT, BankSettings, NormalBank, default_cache_root

__all__ = ["BANK_FORMAT", "BankSettings", "NormalBank", "bank_key", "build_or_load", "default_cache_root", "scan_normals"]
