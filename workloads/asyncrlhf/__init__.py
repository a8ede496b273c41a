"""asyncrlhf: asynchronous RLHF on Kubernetes (and on one machine with `asyncrlhf run`)."""

__version__ = "0.1.0"
