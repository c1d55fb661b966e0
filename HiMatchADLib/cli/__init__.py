"""Layer 10, ``cli``: the ``himatchad`` command (parser, option groups, pre-flight checks, commands)."""

from .main import EXIT_INTERRUPTED, EXIT_USER_ERROR, build_parser, main

__all__ = ["EXIT_INTERRUPTED", "EXIT_USER_ERROR", "build_parser", "main"]
