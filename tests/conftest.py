"""Shared test fixtures and policy.

Policy: a test that needs root or eBPF skips on a developer laptop, but in
CI (CI=true) a skip of such a test is a failure: CI runs as root on a host
where eBPF works, so a skip there means the feature is broken.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, why: str) -> None:
    """Skip (or, in CI, fail) when condition is false."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI, would have skipped: {why}")
    pytest.skip(why)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root")


@pytest.fixture
def root() -> None:
    require_root()
