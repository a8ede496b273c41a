"""Shared pytest options.

`--with-e2e` opts in to the tests marked `e2e`, which need a real Kubernetes cluster (the current
kubeconfig context, with the CRD and the operator installed); without it they are skipped.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--with-e2e", action="store_true", default=False,
        help="run the end-to-end tests against the cluster of the current kubeconfig context",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--with-e2e"):
        return
    skip = pytest.mark.skip(reason="needs a real cluster: pass --with-e2e")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A test that runs `asyncrlhf ...` in-process installs a root handler on the stderr pytest
    captured for it; left behind, it writes to a closed stream in every later test."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
