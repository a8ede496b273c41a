"""asyncrlhf: asynchronous RLHF on Kubernetes (and on one machine with `asyncrlhf run`)."""

from importlib.metadata import PackageNotFoundError, version as _version

try:  # one source: pyproject.toml's version, as installed (pip install . / -e .)
    __version__ = _version("asyncrlhf")
except PackageNotFoundError:  # the sources on sys.path without an install
    __version__ = "0+unknown"
