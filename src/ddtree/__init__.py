"""ddtree: lossless speculative decoding with DFlash drafters and best-first draft trees."""

from .api import init_drafter, load
from .engine import Engine
from .errors import DDTreeError
from .options import METHODS, Decoding, GenerationOptions
from .results import GenerationResult, StreamChunk
from .sampling import SamplingParams

__all__ = ["load", "init_drafter", "Engine", "METHODS", "Decoding", "GenerationOptions", "SamplingParams",
           "DDTreeError", "GenerationResult", "StreamChunk"]
__version__ = "0.1.0"
