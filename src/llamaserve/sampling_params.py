"""SamplingParams: what one request asks of generation. Names and defaults follow vLLM and OpenAI.

Decisions: `top_k` 0 or -1 disables it; `max_tokens=None` means "up to max_seq_len"; logprobs are of the raw
model distribution (before penalties and temperature), as lm-eval expects; `seed` makes a request's samples
independent of whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from llamaserve.errors import InvalidRequestError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or [])]
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._check()

    def _check(self) -> None:  # noqa: C901 (a flat list of independent checks)
        def bad(param: str, why: str) -> None:
            raise InvalidRequestError(f"{param}={getattr(self, param)!r} is invalid: {why}", param)

        if self.n < 1:
            bad("n", "must be at least 1")
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if self.top_k < -1:
            bad("top_k", "must be -1 or 0 (disabled) or a positive number of tokens")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1 disables it)")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", "must be at least 1")
        if self.min_tokens < 0:
            bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must not exceed max_tokens={self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= MAX_LOGPROBS:
                bad(name, f"must be between 0 and {MAX_LOGPROBS}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "every stop sequence must be a non-empty string")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative token ids")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        """Whether sampling reads the tokens generated so far (repetition / presence / frequency penalty)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def for_child(self, index: int) -> SamplingParams:
        """The params of the index-th of n samples: n=1, seed offset so samples differ but stay reproducible."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)
