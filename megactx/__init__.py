"""megactx: serve language models with million-token contexts."""
from megactx.errors import ConfigError, MegactxError, ModelLoadError, RequestError
from megactx.llm import LLM
from megactx.outputs import CompletionOutput, RequestOutput
from megactx.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "MegactxError", "ModelLoadError",
           "ConfigError", "RequestError"]
__version__ = "0.1.0"
