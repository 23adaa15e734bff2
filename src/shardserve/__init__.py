"""shardserve: serve models too big for one device, and many models per machine."""

__version__ = "0.1.0"

from shardserve.llm import LLM
from shardserve.outputs import CompletionOutput, RequestOutput
from shardserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
