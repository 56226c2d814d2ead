"""mlxcluster: a distributed LLM inference cluster (OpenAI API → NATS → mlx-lm workers).

Plugins import what they use from here or from :mod:`mlxcluster.api` (the same names): ``from mlxcluster.api
import hookimpl, Balancer, WorkerView``. Importing the package loads no aiohttp, NATS client or MLX.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mlxcluster")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

from mlxcluster import api  # noqa: E402  (after __version__, which nothing in the api needs)
from mlxcluster.api import *  # noqa: E402, F403  (the api's names, listed once: in mlxcluster.api.__all__)

__all__ = ["__version__"]
__all__ += api.__all__
