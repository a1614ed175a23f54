"""ddtree: lossless speculative decoding with DFlash drafters and best-first draft trees."""

from .api import init_drafter, load
from .engine import METHODS, Engine
from .errors import DDTreeError
from .results import GenerationResult, StreamChunk

__all__ = ["load", "init_drafter", "Engine", "METHODS", "DDTreeError", "GenerationResult", "StreamChunk"]
__version__ = "0.1.0"
