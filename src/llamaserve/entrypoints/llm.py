"""Offline API: `LLM(model=...).generate(prompts, SamplingParams)`, `LLM.chat(...)`, `LLM.stream(...)`.

Runs EngineCore in-process. A prompt is a string, a list of token ids, or {"prompt_token_ids": [...]}.
Invalid input raises `InvalidRequestError` before anything of that call is queued, so other work is unaffected.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, Union

from llamaserve.config import ConfigError, EngineArgs
from llamaserve.engine.engine_core import EngineCore
from llamaserve.engine.output_processor import OutputProcessor
from llamaserve.errors import InvalidRequestError
from llamaserve.loader.tokenizer import eos_token_ids, get_tokenizer
from llamaserve.outputs import RequestOutput
from llamaserve.sampling_params import SamplingParams

PromptType = Union[str, list[int], dict[str, Any]]


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(EngineArgs.field_names()))
        if unknown:
            raise ConfigError(f"unknown engine option(s) {unknown}; known: {', '.join(EngineArgs.field_names())}")
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.config = self.engine_args.create_engine_config()
        self.tokenizer = get_tokenizer(self.config.model_config)
        self.engine = EngineCore(self.config)
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.config.model_config.hf_config)
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidRequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'", "prompt")
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty; give at least one token", "prompt")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise InvalidRequestError("a prompt must be a string, a list of token ids, or a dict", "prompt")

    def add_request(self, prompt: PromptType, params: SamplingParams) -> str:
        """Queue one prompt (all its n samples); returns its request id."""
        return self._add_tokenized(*self._tokenize(prompt), params)

    def _add_tokenized(self, text: str | None, ids: list[int], params: SamplingParams) -> str:
        rid = str(next(self._ids))
        pairs = self.processor.add_request(rid, text, ids, params)
        added: list[str] = []
        try:
            for cid, child_params in pairs:
                self.engine.add_request(cid, ids, child_params, self.eos_token_ids)
                added.append(cid)
        except InvalidRequestError:
            self.processor.abort(rid)
            self.engine.abort_requests(added)
            raise
        return rid

    def step(self) -> list[RequestOutput]:
        outputs, to_abort = self.processor.process(self.engine.step())
        if to_abort:
            self.engine.abort_requests(to_abort)
        return outputs

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise InvalidRequestError("give one SamplingParams, or one per prompt", "sampling_params")
        tokenized = [self._tokenize(p) for p in prompts]  # validate everything before queueing anything
        ids: list[str] = []
        try:
            for (text, token_ids), sp in zip(tokenized, params_list):
                ids.append(self._add_tokenized(text, token_ids, sp))
        except InvalidRequestError:
            for rid in ids:
                self.engine.abort_requests(self.processor.abort(rid))
            raise
        results: dict[str, RequestOutput] = {}
        while len(results) < len(ids):
            if not self.engine.has_unfinished_requests():
                raise RuntimeError("engine went idle with requests unfinished")
            for out in self.step():
                if out.finished:
                    results[out.request_id] = out
        return [results[rid] for rid in ids]

    def stream(self, prompt: PromptType, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one completion (n=1) as it becomes final."""
        params = params or SamplingParams()
        if params.n != 1:
            raise InvalidRequestError("stream() takes n=1", "n")
        rid = self.add_request(prompt, params)
        try:
            while True:
                for out in self.step():
                    if out.request_id == rid:
                        if out.outputs[0].delta_text:
                            yield out.outputs[0].delta_text
                        if out.finished:
                            return
        finally:
            self.engine.abort_requests(self.processor.abort(rid))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model's tokenizer has no chat template", "messages")
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate([self.apply_chat_template(messages)], params)[0]
