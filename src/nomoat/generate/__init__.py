"""Token generation: per-request sampling (penalties, warpers, seeded draws, logprobs) and stop strings."""

from nomoat.generate.sampling import (
    SampleOutput,
    SamplingBatch,
    SamplingParams,
    SamplingState,
    make_generator,
    process_logits,
    sample,
)
from nomoat.generate.stopping import StopStringMatcher

__all__ = [
    "SampleOutput",
    "SamplingBatch",
    "SamplingParams",
    "SamplingState",
    "StopStringMatcher",
    "make_generator",
    "process_logits",
    "sample",
]
