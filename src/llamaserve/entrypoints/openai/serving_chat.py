"""POST /v1/chat/completions: the tokenizer's chat template, then one engine request with `n` samples.

`max_completion_tokens` (or the older `max_tokens`) unset means "up to max_seq_len", as in vLLM. A template
error (e.g. roles that must alternate) is a 400 carrying the template's message. Streaming sends a role chunk per
choice, then content deltas, then a chunk with `finish_reason`; `include_usage` adds a usage chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from llamaserve.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessage
from llamaserve.entrypoints.openai.serving import ServingBase, chat_logprobs, merge, new_id, sse, usage
from llamaserve.errors import InvalidRequestError
from llamaserve.sampling_params import SamplingParams

_RESERVED_TEMPLATE_KWARGS = {"tokenize", "return_dict", "add_generation_prompt", "continue_final_message",
                             "conversation", "messages", "tools", "chat_template", "return_tensors"}


class _Prepared:
    def __init__(self, rid: str, ids: list[int], params: SamplingParams, top: int) -> None:
        self.rid, self.ids, self.params, self.top = rid, ids, params, top


class ServingChat(ServingBase):
    def apply_template(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                       continue_final_message: bool = False, extra: dict[str, Any] | None = None) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model's tokenizer has no chat template; use /v1/completions", "messages")
        extra = dict(extra or {})
        if bad := sorted(set(extra) & _RESERVED_TEMPLATE_KWARGS):
            raise InvalidRequestError(f"chat_template_kwargs may not set {bad}", "chat_template_kwargs")
        conv = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages]
        if continue_final_message and conv[-1]["role"] != "assistant":
            raise InvalidRequestError("continue_final_message needs the last message to be the assistant's",
                                      "continue_final_message")
        try:
            ids = self.tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt,
                                                     continue_final_message=continue_final_message, tokenize=True,
                                                     return_dict=False, **extra)
        except Exception as e:  # jinja2 TemplateError and the template's raise_exception
            raise InvalidRequestError(f"the chat template rejected these messages: {e}", "messages") from None
        return list(ids)

    def prepare(self, req: ChatCompletionRequest) -> _Prepared:
        self.check_model(req.model)
        req.unsupported()
        ids = self.apply_template(req.messages, req.add_generation_prompt, req.continue_final_message,
                                  req.chat_template_kwargs)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        top = req.top_logprobs or 0
        params = req.sampling_params(max_tokens, top if req.logprobs else None, None)
        self.engine.check(ids, params)
        self.engine.admit(params.n)
        return _Prepared(new_id("chatcmpl"), ids, params, top)

    def _stream(self, prep: _Prepared):
        return self.engine.generate(prep.rid, None, prep.ids, prep.params)

    async def full(self, req: ChatCompletionRequest, prep: _Prepared) -> dict[str, Any]:
        final = None
        async for _, out in merge([self._stream(prep)]):
            if out.finished:
                final = out
        assert final is not None
        choices = []
        for c in final.outputs:
            lps = chat_logprobs(self, c.token_ids, c.logprobs or [], prep.top) if req.logprobs else None
            choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": lps, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return {"id": prep.rid, "object": "chat.completion", "created": self.now(), "model": self.model_name,
                "choices": choices,
                "usage": usage(len(prep.ids), sum(len(c.token_ids) for c in final.outputs))}

    async def stream(self, req: ChatCompletionRequest, prep: _Prepared) -> AsyncIterator[str]:
        created = self.now()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        sent: dict[int, int] = {}
        completion: dict[int, int] = {}

        def chunk(choice: dict[str, Any]) -> str:
            d: dict[str, Any] = {"id": prep.rid, "object": "chat.completion.chunk", "created": created,
                                 "model": self.model_name, "choices": [choice]}
            if continuous:
                d["usage"] = usage(len(prep.ids), sum(completion.values()))
            return sse(d)

        for i in range(prep.params.n):
            sent[i] = 0
            yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None})
        async for _, out in merge([self._stream(prep)]):
            for c in out.outputs:
                completion[c.index] = len(c.token_ids)
                done = c.finish_reason is not None
                if not c.delta_text and not done:
                    continue
                lps = None
                if req.logprobs:
                    start = sent[c.index]
                    lps = chat_logprobs(self, c.token_ids[start:], (c.logprobs or [])[start:], prep.top)
                sent[c.index] = len(c.token_ids)
                delta = {"content": c.delta_text} if c.delta_text else {}
                yield chunk({"index": c.index, "delta": delta, "logprobs": lps,
                             "finish_reason": c.finish_reason if done else None,
                             "stop_reason": c.stop_reason if done else None})
        if include_usage:
            yield sse({"id": prep.rid, "object": "chat.completion.chunk", "created": created,
                       "model": self.model_name, "choices": [],
                       "usage": usage(len(prep.ids), sum(completion.values()))})
        yield sse("[DONE]")
