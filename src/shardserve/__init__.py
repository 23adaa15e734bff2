"""shardserve: serve models too big for one device, and many models per machine."""

from shardserve.outputs import CompletionOutput, RequestOutput
from shardserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    # LLM pulls in torch; importing it lazily keeps `import shardserve.api...` torch-free.
    if name == "LLM":
        from shardserve.llm import LLM

        return LLM
    raise AttributeError(f"module 'shardserve' has no attribute {name!r}")
