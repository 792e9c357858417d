"""OutputProcessor: turns EngineCoreOutputs into user-facing RequestOutputs (front-end side, no tensors).

Owns per-request state that needs the tokenizer: incremental text, stop strings, decoded logprob tokens,
cumulative logprob, and the fan-out of `n` > 1 into child requests `"{request_id}-{index}"` that share the
parent's prompt. A stop string ends a child here; `process` returns the ids the engine core must abort.
Used by the offline LLM and by the server's async engine alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llamaserve.engine.detokenizer import IncrementalDetokenizer
from llamaserve.outputs import CompletionOutput, EngineCoreOutput, RequestOutput, TokenLogprobs
from llamaserve.sampling_params import SamplingParams


@dataclass
class _Child:
    parent: str
    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[_Child]
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_cached_tokens: int = 0


def child_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}-{index}"


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, _Parent] = {}
        self.children: dict[str, _Child] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> list[tuple[str, SamplingParams]]:
        """Register a request; returns the (child id, child params) pairs to add to the engine core."""
        pairs = [(child_id(request_id, i, params.n), params.for_child(i)) for i in range(params.n)]
        kids = [_Child(request_id, i, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, p),
                       logprobs=[] if p.logprobs is not None else None,
                       cumulative_logprob=0.0 if p.logprobs is not None else None)
                for i, (_, p) in enumerate(pairs)]
        self.parents[request_id] = _Parent(request_id, prompt, prompt_token_ids, params, kids,
                                           [None] if params.prompt_logprobs is not None else None)
        for (cid, _), kid in zip(pairs, kids):
            self.children[cid] = kid
        return pairs

    def _decode_logprobs(self, entries: list[TokenLogprobs]) -> list[TokenLogprobs]:
        for entry in entries:
            for tid, lp in entry.items():
                lp.decoded_token = self.tokenizer.decode([tid])
        return entries

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns (outputs of the parents touched, child ids the engine core must abort)."""
        touched: dict[str, None] = {}
        to_abort: list[str] = []
        for out in outputs:
            kid = self.children.get(out.request_id)
            if kid is None:
                continue
            parent = self.parents[kid.parent]
            parent.num_cached_tokens = max(parent.num_cached_tokens, out.num_cached_tokens)
            if out.new_prompt_logprobs and kid.index == 0 and parent.prompt_logprobs is not None:
                parent.prompt_logprobs.extend(self._decode_logprobs(out.new_prompt_logprobs))
            if out.new_token_ids:
                kid.token_ids.extend(out.new_token_ids)
                if out.new_logprobs and kid.logprobs is not None:
                    kid.logprobs.extend(self._decode_logprobs(out.new_logprobs))
                    kid.cumulative_logprob += sum(e[t].logprob for e, t in zip(out.new_logprobs,
                                                                               out.new_token_ids))
                stop = kid.detok.update(out.new_token_ids, final=out.finished)
                if stop is not None:
                    kid.finish_reason, kid.stop_reason = "stop", stop
                    if not out.finished:
                        to_abort.append(out.request_id)
            if kid.finish_reason is None and out.finished:
                kid.finish_reason, kid.stop_reason = out.finish_reason, out.stop_reason
            touched[kid.parent] = None
        return [self._make_output(pid) for pid in touched], to_abort

    def _make_output(self, parent_id: str) -> RequestOutput:
        p = self.parents[parent_id]
        outs = [CompletionOutput(k.index, k.detok.output_text, list(k.token_ids), k.cumulative_logprob,
                                 k.logprobs, k.finish_reason, k.stop_reason,
                                 k.detok.take_delta(k.finish_reason is not None)) for k in p.children]
        finished = all(k.finish_reason is not None for k in p.children)
        if finished:
            self.parents.pop(parent_id)
            for i in range(len(p.children)):
                self.children.pop(child_id(parent_id, i, len(p.children)), None)
        return RequestOutput(parent_id, p.prompt, p.prompt_token_ids, p.prompt_logprobs, outs, finished,
                             p.num_cached_tokens)

    def abort(self, request_id: str) -> list[str]:
        """Forget a parent; returns its child ids for the engine core to abort."""
        p = self.parents.pop(request_id, None)
        if p is None:
            return []
        ids = [child_id(request_id, i, len(p.children)) for i in range(len(p.children))]
        for cid in ids:
            self.children.pop(cid, None)
        return ids
