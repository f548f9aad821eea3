"""Process-wide CLI settings set by the top-level callback."""
from dataclasses import dataclass


@dataclass
class Settings:
    debug: bool = False
    verbosity: int = 0  # -1 quiet, 0 normal, 1+ verbose


settings = Settings()
