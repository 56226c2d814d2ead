"""mlxcluster: a distributed LLM inference cluster (OpenAI API → NATS → mlx-lm workers)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mlxcluster")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

from mlxcluster.hookspecs import hookimpl  # noqa: E402  (plugins write ``from mlxcluster import hookimpl``)

__all__ = ["__version__", "hookimpl"]
