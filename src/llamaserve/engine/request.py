"""Request: one sequence being generated, as the scheduler and KV cache manager see it.

`num_tokens` (prompt + output) and `num_computed_tokens` (how many have K/V in the cache) are the whole
scheduling state: each step the scheduler lets computed catch up. Preemption resets computed to 0.

Overlap scheduling: when a step that samples for this request is queued, the engine appends PLACEHOLDER to its
tokens at once (`num_pending` counts them), so the next step can be scheduled before the token is known; the
model runner feeds the real id from the device, and the engine writes it in when the step's results arrive.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from llamaserve.sampling_params import SamplingParams

PLACEHOLDER = -1  # an output token sampled by a step that is still running


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    max_tokens: int
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit length at first admission; -1 until admitted
    num_prompt_logprobs: int = 0  # prompt positions whose logprobs were already returned
    block_hashes: list[int] = field(default_factory=list)
    first_scheduled_time: float | None = None
    num_pending: int = 0  # trailing PLACEHOLDER tokens (at most 2: the step in flight and the one just queued)

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_known_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_pending

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if token_id == PLACEHOLDER:
            self.num_pending += 1

    def resolve_pending(self, token_id: int) -> int:
        """Write the oldest placeholder's real token; returns its output index."""
        idx = len(self.output_token_ids) - self.num_pending
        self.output_token_ids[idx] = token_id
        self.all_token_ids[self.num_prompt_tokens + idx] = token_id
        self.num_pending -= 1
        return idx
