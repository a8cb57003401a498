"""The ``sda-local`` command line: a thin layer over the Python API. One module per command (group);
``common`` holds what they share."""

from .common import main
from . import bench, chat, evaluate, generate, judge, models, serve  # noqa: F401  (they register their commands)

__all__ = ["main"]
