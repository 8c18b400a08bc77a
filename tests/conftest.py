from __future__ import annotations

import pytest

from tests.factories import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def quiet_gc():
    """Collect now and pause the cyclic GC for the test: in a process that has loaded models,
    a full collection can stall the event loop for 100+ ms and skew timing checks."""
    import gc

    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
