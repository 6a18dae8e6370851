"""Request and response bodies, split by use. OpenAI-compatible where OpenAI has the endpoint."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    Tag,
    ValidationInfo,
    field_validator,
)

from server.generation import SamplingParams

MAX_INPUTS = 256  # texts in one /v1/classify or /v1/embeddings request


def check_unicode(texts: str | list[str] | None, what: str) -> None:
    """Refuse text that cannot be encoded as UTF-8 (a lone surrogate such as ``\\ud800``).

    JSON escapes can carry one; the tokenizer and the response encoder cannot.
    """
    items = [texts] if isinstance(texts, str) else (texts or [])
    for i, t in enumerate(items):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            where = what if isinstance(texts, str) else f"{what}[{i}]"
            raise ValueError(
                f"{where} is not valid Unicode: contains a lone surrogate at character {e.start}"
            ) from None


def _check_inputs(v: str | list[str]) -> str | list[str]:
    if isinstance(v, list) and not 1 <= len(v) <= MAX_INPUTS:
        raise ValueError(f"a list of 1 to {MAX_INPUTS} texts, got {len(v)}")
    items = [v] if isinstance(v, str) else v
    if empty := [i for i, t in enumerate(items) if not t]:
        which = "the text" if isinstance(v, str) else f"text {empty[0]}"
        raise ValueError(f"{which} is empty")  # as OpenAI's embeddings refuse it
    check_unicode(v, "input")
    return v


# OpenAI parameters this server does not implement: a request that turns one on gets a
# 422 naming it, not a 200 that quietly lacks it. Their "off" values pass.
UNSUPPORTED = (
    "logprobs",
    "top_logprobs",
    "best_of",
    "suffix",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
)


_OFF_TOO = {
    "best_of": 1,
    "tool_choice": "none",
    "function_call": "none",
    "response_format": {"type": "text"},
}


def _is_off(name: str, value: Any) -> bool:
    """Whether ``value`` leaves the unsupported parameter ``name`` off: null, false, 0,
    empty, or its own default (``_OFF_TOO``). ``logprobs`` is off only as null or false:
    completions' ``logprobs: 0`` asks for the sampled token's own logprob."""
    if name == "logprobs":
        return value is None or value is False
    return value is None or value in (False, "", [], {}) or value == _OFF_TOO.get(name, 0)


_OFF = Field(None, description="Not supported: accepted only when off (null, false, 0, empty).")

# /v1/completions generates this many tokens when max_tokens is not sent (OpenAI's default),
# or the server's DAREX_MAX_NEW_TOKENS when that is lower
COMPLETION_MAX_TOKENS = 16


class _Sampling(BaseModel):
    """Fields shared by completions and chat (OpenAI names and defaults)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=200, description="model_id, or the base's id")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, ge=0.0, le=1.0, description="0 keeps only the top token.")
    seed: int | None = Field(
        None, ge=-(2**63), lt=2**63, description="Per-request sampling seed (a 64-bit integer)."
    )
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: Literal[1] = Field(1, description="Only one choice per prompt is generated.")
    user: str | None = None

    # the OpenAI parameters in UNSUPPORTED: accepted only when off (see ``_is_off``)
    logprobs: Any = _OFF
    top_logprobs: Any = _OFF
    best_of: Any = _OFF
    suffix: Any = _OFF
    logit_bias: Any = _OFF
    presence_penalty: Any = _OFF
    frequency_penalty: Any = _OFF
    tools: Any = _OFF
    tool_choice: Any = _OFF
    functions: Any = _OFF
    function_call: Any = _OFF
    response_format: Any = _OFF

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        if not _is_off(info.field_name or "", v):
            raise ValueError(
                "not supported by this server (leave it out, or send its default value)"
            )
        return v

    @field_validator(
        "temperature", "top_p", "n", "stream", "echo", mode="before", check_fields=False
    )
    @classmethod
    def _null_is_default(cls, v: Any, info: ValidationInfo) -> Any:
        """null means the default, as in OpenAI's API (clients and wrappers send it);
        ``echo`` is completions' own field."""
        if v is None:
            return cls.model_fields[info.field_name or ""].default
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and "stream" in info.data and not info.data["stream"]:  # as OpenAI
            raise ValueError("only allowed when stream is true")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        check_unicode(v, "stop")
        return v

    def sampling(self, default_max: int) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=self.max_tokens or default_max,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(stops),
        )

    def asked_max(self) -> tuple[str, int] | None:
        """``(field, value)`` of the generation length the client set, None when it set none."""
        if "max_tokens" in self.model_fields_set and self.max_tokens is not None:
            return "max_tokens", self.max_tokens
        return None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


def _prompt_kind(v: Any) -> str:
    """Which form a completions ``prompt`` has, from its first item: so that an error
    names the bad item of that form, not every form's mismatch."""
    if isinstance(v, str):
        return "str"
    first = v[0] if isinstance(v, list) and v else None
    if isinstance(first, list):
        return "list[list[int]]"
    if isinstance(first, int) and not isinstance(first, bool):
        return "list[int]"
    return "list[str]"


Prompt = Annotated[
    Annotated[str, Tag("str")]
    | Annotated[list[str], Tag("list[str]")]
    | Annotated[list[StrictInt], Tag("list[int]")]
    | Annotated[list[list[StrictInt]], Tag("list[list[int]]")],
    Discriminator(_prompt_kind),
]


class CompletionRequest(_Sampling):
    prompt: Prompt = Field(
        description="One prompt (text, or token ids), or a list of them (one choice each)."
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        description=f"Tokens to generate at most; null or absent: {COMPLETION_MAX_TOKENS} "
        "(or the server's limit when lower).",
    )
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("an empty list: give a prompt, or token ids")
        if isinstance(v, list) and isinstance(v[0], str | list) and len(v) > 64:
            raise ValueError("a list of 1 to 64 prompts")
        if isinstance(v, list) and isinstance(v[0], list) and not all(v):
            raise ValueError("a prompt of token ids is empty")
        if isinstance(v, str) or isinstance(v[0], str):
            check_unicode(v, "prompt")
        return v

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text, or token ids."""
        v = self.prompt
        if isinstance(v, str) or (v and isinstance(v[0], int)):
            return [v]  # type: ignore[list-item]
        return list(v)  # type: ignore[arg-type]


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = ""

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[TextPart] | None) -> str | list[TextPart] | None:
        check_unicode([p.text for p in v] if isinstance(v, list) else v, "content")
        return v

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def asked_max(self) -> tuple[str, int] | None:
        if self.max_completion_tokens is not None and self.max_tokens is None:
            return "max_completion_tokens", self.max_completion_tokens
        return super().asked_max()

    def sampling(self, default_max: int) -> SamplingParams:
        # max_tokens, else max_completion_tokens, else the server's default
        return super().sampling(self.max_completion_tokens or default_max)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: str | None
    logprobs: None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "darex"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    input: str | list[str] = Field(description="One text or a list of up to 256.")

    @field_validator("input")
    @classmethod
    def _input(cls, v: str | list[str]) -> str | list[str]:
        return _check_inputs(v)

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Classification(BaseModel):
    index: int
    label: str
    score: float
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Classification]

    @classmethod
    def from_probs(
        cls, model: str, probs: list[list[float]], labels: list[str] | None
    ) -> ClassifyResponse:
        """One row per input: every label's probability, and the argmax as ``label``."""
        data = []
        for i, row in enumerate(probs):
            names = (
                labels
                if labels and len(labels) == len(row)
                else [f"LABEL_{j}" for j in range(len(row))]
            )
            best = max(range(len(row)), key=row.__getitem__)
            scores = dict(zip(names, row, strict=True))
            data.append(Classification(index=i, label=names[best], score=row[best], scores=scores))
        return cls(model=model, data=data)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    input: str | list[str] = Field(description="One text or a list of up to 256.")
    # the openai client asks for base64 unless told otherwise, and decodes it itself
    encoding_format: Literal["float", "base64"] | None = Field(
        "float", description="float: a list of numbers; base64: little-endian float32 bytes."
    )
    dimensions: int | None = Field(
        None, ge=1, description="The model's width when given: embeddings are not shortened."
    )

    @field_validator("input")
    @classmethod
    def _input(cls, v: str | list[str]) -> str | list[str]:
        return _check_inputs(v)

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Embedding]
    usage: dict[str, int]

    @classmethod
    def build(
        cls, model: str, vecs: list[list[float]], tokens: int, req: EmbeddingRequest
    ) -> EmbeddingResponse:
        """The answer to ``req``, in its ``encoding_format`` (``dimensions`` is checked
        before the work, by ``routes.common.check_dimensions``)."""
        if req.encoding_format == "base64":
            vecs = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vecs]
        data = [Embedding(index=i, embedding=v) for i, v in enumerate(vecs)]
        return cls(model=model, data=data, usage={"prompt_tokens": tokens, "total_tokens": tokens})


# ---- admin ----------------------------------------------------------------------------


class JobAccepted(BaseModel):
    job_id: str
    model_id: str
    state: str


class JobPublic(BaseModel):
    id: str
    model_id: str
    state: str
    progress: float
    message: str
    error: str | None
    created: float
    updated: float


class ModelPublic(BaseModel):
    """What the admin sees of a stored fine-tune."""

    id: str
    task: str
    labels: list[str] | None
    base: str
    base_sha256: str
    method: str
    p: float | None
    q: float | dict[str, float] | None
    reason: str = ""  # why this method and q (the recommendation, the q search's result)
    stored_bytes: int
    fp16_bytes: int | None
    ratio_vs_fp16: float | None
    tensors: int
    created: float | None


class Deleted(BaseModel):
    id: str
    deleted: bool
