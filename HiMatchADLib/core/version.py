"""The package version (one place: the root package, pyproject and every scores JSON read it)."""

__version__ = "0.1.0"
