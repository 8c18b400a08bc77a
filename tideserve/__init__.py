"""tideserve: elastic, cost-effective LLM serving.

`from tideserve import LLM, SamplingParams` is the offline API; the heavy imports (torch) happen
on first use, so control-plane processes that never touch the engine stay light.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from tideserve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from tideserve.engine.sequence import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'tideserve' has no attribute {name!r}")
