"""llamaserve: an LLM inference engine and server for the Llama family."""

from llamaserve.config import ConfigError, EngineArgs
from llamaserve.errors import InvalidRequestError
from llamaserve.outputs import CompletionOutput, RequestOutput
from llamaserve.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput", "ConfigError",
           "InvalidRequestError", "__version__"]


def __getattr__(name: str):
    if name == "LLM":  # lazy: importing the package must not load torch models
        from llamaserve.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
