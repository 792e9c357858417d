"""Request bodies of the OpenAI-compatible API (pydantic), with vLLM's extra sampling fields.

Every model forbids unknown fields, so a field we do not know is a 400 that names it. Fields that OpenAI defines
but llamaserve does not implement are declared and refused by `unsupported()` with a message saying so, unless
their value is the one that changes nothing (e.g. `logit_bias: {}`, `tool_choice: "none"`, `best_of == n`).
`user` is accepted: it only labels the request.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from llamaserve.errors import InvalidRequestError
from llamaserve.sampling_params import SamplingParams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool | None = False
    continuous_usage_stats: StrictBool | None = False


class _Sampling(_Strict):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: StrictInt = 1
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    top_k: StrictInt | None = None
    min_p: StrictFloat | None = None
    seed: StrictInt | None = None
    stop: Union[str, list[str]] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = 0
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    repetition_penalty: StrictFloat | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, Any] | None = None
    best_of: StrictInt | None = None

    def _common_unsupported(self) -> None:
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported by llamaserve", "logit_bias")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of other than n is not supported by llamaserve", "best_of")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", "stream_options")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None) -> SamplingParams:
        kw: dict[str, Any] = {}
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            if (v := getattr(self, name)) is not None:
                kw[name] = v
        return SamplingParams(n=self.n, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids or [],
                              ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, max_tokens=max_tokens,
                              include_stop_str_in_output=self.include_stop_str_in_output,
                              skip_special_tokens=self.skip_special_tokens, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, **kw)


PromptField = Union[str, list[StrictInt], list[str], list[list[StrictInt]]]


class CompletionRequest(_Sampling):
    prompt: PromptField
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: str | None = None
    add_special_tokens: StrictBool = True
    prompt_logprobs: StrictInt | None = None

    def unsupported(self) -> None:
        self._common_unsupported()
        if self.suffix:
            raise InvalidRequestError("suffix is not supported by llamaserve", "suffix")

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (each text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequestError("prompt is empty; give a string, a list of strings or token ids", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            kind = part.get("type")
            if kind != "text":
                raise InvalidRequestError(f"content parts of type {kind!r} are not supported; this server takes text "
                                          "only", "messages")
            parts.append(TextPart(**part).text)
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any]] | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> None:
        self._common_unsupported()
        if self.tools:
            raise InvalidRequestError("tools are not supported by llamaserve", "tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise InvalidRequestError("tool_choice is not supported by llamaserve (no tools)", "tool_choice")
        if self.response_format and self.response_format.get("type") != "text":
            raise InvalidRequestError("response_format other than {'type': 'text'} is not supported by llamaserve",
                                      "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs=true", "top_logprobs")
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidRequestError("continue_final_message and add_generation_prompt cannot both be true",
                                      "continue_final_message")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise InvalidRequestError("give max_completion_tokens or max_tokens, not two different values",
                                      "max_completion_tokens")


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[StrictInt]
