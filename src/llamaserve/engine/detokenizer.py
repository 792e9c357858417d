"""Incremental detokenization and stop strings, for one request.

Text is decoded over a sliding window of token ids (a few prompt tokens of context, then the output), emitting
only text that is final: a window ending in an incomplete UTF-8 sequence ("\ufffd") waits for the next token.
Stop strings are searched in the newly added text plus the tail that could start one, so a stop string split
across tokens is caught. On a stop string, the text is cut before it (or after it with
`include_stop_str_in_output`). For streaming, `take_delta()` holds back the last len(longest stop) - 1
characters until they can no longer begin a stop string.
"""

from __future__ import annotations

from typing import Any

from llamaserve.sampling_params import SamplingParams

_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special = params.skip_special_tokens
        self.stop = list(params.stop or [])
        self.include_stop = params.include_stop_str_in_output
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.output_text = ""
        self.sent = 0  # characters of output_text already handed out by take_delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def update(self, new_token_ids: list[int], final: bool = False) -> str | None:
        """Add tokens; returns the stop string that ended the text, if any."""
        self.ids.extend(new_token_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return None
        new_text = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = max(0, len(self.output_text) - self.hold)
        self.output_text += new_text
        found = [(idx, s) for s in self.stop if (idx := self.output_text.find(s, start)) >= 0]
        if not found:
            return None
        idx, s = min(found)
        self.output_text = self.output_text[: idx + (len(s) if self.include_stop else 0)]
        return s

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out that can no longer change (all of it once finished)."""
        end = len(self.output_text) if finished or not self.stop else max(self.sent, len(self.output_text) - self.hold)
        delta = self.output_text[self.sent : end]
        self.sent = end
        return delta
