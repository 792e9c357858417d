"""POST /v1/completions: one engine request per prompt, `n` samples each; choice index = prompt * n + sample.

`echo` returns the prompt before the completion and, with `logprobs`, the prompt's logprobs first (a leading
null for the first prompt token), which is what lm-eval's loglikelihood reads. Streaming sends one SSE chunk per
choice whenever its text grows, then `[DONE]`; `stream_options.include_usage` adds a final usage chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from llamaserve.entrypoints.openai.protocol import CompletionRequest
from llamaserve.entrypoints.openai.serving import (
    CompletionLogprobs,
    ServingBase,
    merge,
    new_id,
    sse,
    usage,
)
from llamaserve.outputs import CompletionOutput, RequestOutput
from llamaserve.sampling_params import SamplingParams


class _Prepared:
    def __init__(self, rid: str, texts: list[str], ids: list[list[int]], params: SamplingParams) -> None:
        self.rid, self.texts, self.ids, self.params = rid, texts, ids, params


class ServingCompletion(ServingBase):
    def prepare(self, req: CompletionRequest) -> _Prepared:
        """Validate everything (raises before any response byte); returns what to run."""
        self.check_model(req.model)
        req.unsupported()
        prompt_lps = req.prompt_logprobs
        if req.echo and req.logprobs is not None:
            prompt_lps = max(prompt_lps or 0, req.logprobs)
        params = req.sampling_params(req.max_tokens, req.logprobs, prompt_lps)
        texts, ids = [], []
        for p in req.prompts():
            text, token_ids = self.tokenize_prompt(p, req.add_special_tokens)
            self.engine.check(token_ids, params)
            texts.append(text)
            ids.append(token_ids)
        self.engine.admit(params.n * len(ids))
        return _Prepared(new_id("cmpl"), texts, ids, params)

    def _streams(self, prep: _Prepared) -> list[AsyncIterator[RequestOutput]]:
        return [self.engine.generate(f"{prep.rid}-{i}", t, ids, prep.params)
                for i, (t, ids) in enumerate(zip(prep.texts, prep.ids))]

    def _echo_logprobs(self, lp: CompletionLogprobs, out: RequestOutput) -> dict[str, Any]:
        entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        return lp.build(out.prompt_token_ids, entries)

    async def full(self, req: CompletionRequest, prep: _Prepared) -> dict[str, Any]:
        finals: dict[int, RequestOutput] = {}
        async for i, out in merge(self._streams(prep)):
            if out.finished:
                finals[i] = out
        n = prep.params.n
        choices = []
        prompt_tokens = completion_tokens = 0
        for i in range(len(prep.ids)):
            out = finals[i]
            prompt_tokens += len(out.prompt_token_ids)
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                text = c.text
                logprobs = None
                if req.logprobs is not None:
                    lp = CompletionLogprobs(self, req.logprobs)
                    logprobs = self._echo_logprobs(lp, out) if req.echo else None
                    gen = lp.build(c.token_ids, c.logprobs or [])
                    logprobs = gen if logprobs is None else {k: logprobs[k] + gen[k] for k in gen}
                if req.echo:
                    text = prep.texts[i] + text
                choices.append({"index": i * n + c.index, "text": text, "logprobs": logprobs,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return {"id": prep.rid, "object": "text_completion", "created": self.now(), "model": self.model_name,
                "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    async def stream(self, req: CompletionRequest, prep: _Prepared) -> AsyncIterator[str]:
        n = prep.params.n
        created = self.now()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        sent_tokens: dict[int, int] = {}
        lps: dict[int, CompletionLogprobs] = {}
        prompt_tokens = {i: len(ids) for i, ids in enumerate(prep.ids)}
        completion_tokens: dict[int, int] = {}

        def chunk(index: int, text: str, logprobs: Any, c: CompletionOutput | None) -> dict[str, Any]:
            d: dict[str, Any] = {
                "id": prep.rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": [{"index": index, "text": text, "logprobs": logprobs,
                             "finish_reason": c.finish_reason if c else None,
                             "stop_reason": c.stop_reason if c else None}]}
            if continuous:
                d["usage"] = usage(sum(prompt_tokens.values()), sum(completion_tokens.values()))
            return d

        async for i, out in merge(self._streams(prep)):
            for c in out.outputs:
                idx = i * n + c.index
                first = idx not in sent_tokens
                if first:
                    sent_tokens[idx] = 0
                    lps[idx] = CompletionLogprobs(self, req.logprobs or 0)
                completion_tokens[idx] = len(c.token_ids)
                done = c.finish_reason is not None
                echo_now = first and req.echo
                if not c.delta_text and not done and not echo_now:
                    continue  # nothing final to send yet (e.g. held back for a stop string)
                logprobs = None
                if req.logprobs is not None:
                    start = sent_tokens[idx]
                    gen = lps[idx].build(c.token_ids[start:], (c.logprobs or [])[start:])
                    if echo_now:
                        lps[idx].offset = 0
                        echo = self._echo_logprobs(lps[idx], out)
                        gen = lps[idx].build(c.token_ids[start:], (c.logprobs or [])[start:])
                        gen = {k: echo[k] + gen[k] for k in gen}
                    logprobs = gen
                text = (prep.texts[i] if echo_now else "") + c.delta_text
                sent_tokens[idx] = len(c.token_ids)
                yield sse(chunk(idx, text, logprobs, c if done else None))
        if include_usage:
            yield sse({"id": prep.rid, "object": "text_completion", "created": created, "model": self.model_name,
                       "choices": [], "usage": usage(sum(prompt_tokens.values()), sum(completion_tokens.values()))})
        yield sse("[DONE]")
