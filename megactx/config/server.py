"""ServerConfig: where `megactx serve` listens and whom it answers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from megactx.config.fields import setting
from megactx.errors import ConfigError


@dataclass(slots=True)
class ServerConfig:
    prefix: ClassVar[str] = ""
    title: ClassVar[str] = "Server"

    host: str = setting("127.0.0.1", "address to listen on (loopback by default)")
    port: int = setting(8000, "port to listen on")
    api_key: str | None = setting(None, "require 'Authorization: Bearer KEY' on every endpoint but /health and "
                                        "/metrics")
    served_model_name: str | None = setting(None, "the model's name in the API (default: the file's name)")
    allowed_origins: str | None = setting(None, "comma list of origins whose web pages may call the API (CORS), "
                                                "e.g. http://localhost:3000, or * for any; off by default")

    def __post_init__(self):
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port {self.port} is not a TCP port (0-65535)")
