"""The old import path of the image source and the cache store, kept while callers move.

``medclipin.data.cache`` had two jobs and is now three modules that say what they are:

* :mod:`medclipin.data.image_source` — a file → geometry-normalised uint8 pixels (``open_image_source``,
  ``ImageSource``, ``prepare_image``);
* :mod:`medclipin.data.image_cache` — the decode-once cache on disk (``CacheError``, ``CacheReader``,
  ``CacheWriter``, index, rejects);
* :mod:`medclipin.data.preprocess` — ``build_cache``, the work of ``medclipin preprocess``.

New code imports from those modules; this one only re-exports their public names.
"""

from medclipin.data.image_cache import CacheError, cache_key, read_cache_index, read_cache_meta
from medclipin.data.image_source import ImageSource, default_channels, open_image_source, prepare_image
from medclipin.data.preprocess import CacheSummary, build_cache

__all__ = [
    "CacheError", "CacheSummary", "ImageSource", "build_cache", "cache_key", "default_channels",
    "open_image_source", "prepare_image", "read_cache_index", "read_cache_meta",
]
