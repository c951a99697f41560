"""Token generation: the engine (`nomoat.generate.engine`) and the per-request pieces it applies row by row.

Re-exported here: `sampling` (`SamplingParams`, `sample`: penalties, warpers, seeded draws, raw logprobs) and
`stopping` (`StopStringMatcher`). Imported from their own paths: `engine` (`Engine`: continuous batching, per-row
adapters), `prefix_cache`, and the chat fronts `chat` (local) and `remote` (over a running server).
"""

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
