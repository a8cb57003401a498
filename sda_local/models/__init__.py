"""Model files: the catalogue and the user's registered models (registry.py), downloads (download.py), other
tools' model stores (stores.py), GGUF loading over llama.cpp (gguf.py), and what this machine's CPU and
llama.cpp build can do with them (hardware.py). ``sda_local.models`` itself is the catalogue's API."""

from .registry import (
    CACHE_ENV, CATALOGUE_ENV, USER_CATALOGUE, CatalogueModel, WheelPart, cache_dir, catalogue, catalogue_path,
    check_name, default_model_name, find, lookup, pull, pull_source, resolve, sha256_of, user_catalogue_path,
    user_models,
)

__all__ = [
    "CACHE_ENV", "CATALOGUE_ENV", "USER_CATALOGUE", "CatalogueModel", "WheelPart", "cache_dir", "catalogue",
    "catalogue_path", "check_name", "default_model_name", "find", "lookup", "pull", "pull_source", "resolve",
    "sha256_of", "user_catalogue_path", "user_models",
]
