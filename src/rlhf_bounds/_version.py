"""The package version (a module of its own, so that any module can import it in any order)."""

__version__ = "0.1.0"
