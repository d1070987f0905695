"""Configuration: the model's architecture (model.py) and every setting the user chooses, one dataclass per
concern (engine.py, attention.py, server.py), each field declared once with its default and help (fields.py)."""
from megactx.config.attention import DCAConfig, SparseConfig
from megactx.config.engine import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from megactx.config.fields import ceil_div, log_fmt_bytes, parse_bytes, parse_dtype
from megactx.config.model import ModelConfig
from megactx.config.server import ServerConfig

__all__ = ["CacheConfig", "DCAConfig", "EngineConfig", "ModelConfig", "ParallelConfig", "SchedulerConfig", "ServerConfig",
           "SparseConfig", "ceil_div", "log_fmt_bytes", "parse_bytes", "parse_dtype"]
