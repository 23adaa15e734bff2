"""Request and response bodies (pydantic), in OpenAI's and the Open Inference Protocol's
shapes. Fields OpenAI clients send that we do not use are ignored, not refused."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shardserve.sampling_params import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    allowed_token_ids: list[int] | None = None

    def sampling_params(self, default_max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n,
            max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, stop=stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
            allowed_token_ids=self.allowed_token_ids)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int]
    logprobs: int | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    truncate: bool = False  # cut inputs longer than the model takes (else 400)


class GenerateRequest(BaseModel):
    """Triton's generate extension: text in, text out, parameters beside."""

    model_config = ConfigDict(extra="forbid")

    text_input: str
    parameters: dict[str, float | int | bool | str | list[str]] = Field(default_factory=dict)


class InferTensor(BaseModel):
    """An input tensor: ``data`` in the JSON, or ``parameters.binary_data_size`` bytes after
    it (the binary tensor data extension; ``api/routes/kserve.read_infer`` fills ``data``)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    datatype: str
    shape: list[int]
    data: list | None = None
    parameters: dict[str, float | int | bool | str] = Field(default_factory=dict)


class InferRequestedOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    parameters: dict[str, float | int | bool | str] = Field(default_factory=dict)


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    inputs: list[InferTensor]
    outputs: list[InferRequestedOutput] = Field(default_factory=list)
    parameters: dict[str, float | int | bool | str | list[str]] = Field(default_factory=dict)
