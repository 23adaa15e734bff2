"""The offline API: ``LLM(model=DIR, tensor_parallel_size=2).generate(prompts, params)``."""

from __future__ import annotations

from shardserve.config import DeviceConfig, ModelConfig, ParallelConfig
from shardserve.engine.llm_engine import LLMEngine
from shardserve.engine.sequence import Sequence
from shardserve.outputs import CompletionOutput, RequestOutput
from shardserve.sampling_params import SamplingParams


class LLM:
    """A model sharded over ``tensor_parallel_size`` devices, generating in batches.

    ``devices`` defaults to one CPU device per rank (``cpu:{tensor_parallel_size}``);
    ``device_memory`` is each device's budget (``"2GiB"``; default host memory / devices).
    """

    def __init__(self, model: str, tensor_parallel_size: int = 1, devices: str | None = None,
                 device_memory: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = None, max_num_seqs: int = 64) -> None:
        self.model_config = ModelConfig(model, dtype, max_model_len)
        parallel = ParallelConfig(tensor_parallel_size)
        device = DeviceConfig(devices or f"cpu:{tensor_parallel_size}", device_memory)
        self.engine = LLMEngine(self.model_config, parallel, device, max_num_seqs)
        self.tokenizer = None
        if self.model_config.tokenizer_path:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(self.model_config.tokenizer_path)

    def generate(self, prompts: str | list[str] | None = None,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 prompt_token_ids: list[list[int]] | None = None) -> list[RequestOutput]:
        """One output per request, in request order."""
        token_lists, texts = self._inputs(prompts, prompt_token_ids)
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(token_lists)
        if len(params) != len(token_lists):
            raise ValueError(f"got {len(params)} sampling_params for {len(token_lists)} prompts;"
                             " give one, or one per prompt")
        ids = [self.engine.add_request(t, p, text)
               for t, p, text in zip(token_lists, params, texts, strict=True)]
        finished: dict[str, Sequence] = {}
        while self.engine.has_unfinished():
            finished.update((s.req_id, s) for s in self.engine.step())
        return [self._output(finished[i]) for i in ids]

    def _inputs(self, prompts, prompt_token_ids) -> tuple[list[list[int]], list[str | None]]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give either prompts or prompt_token_ids")
        if prompt_token_ids is not None:
            return [list(t) for t in prompt_token_ids], [None] * len(prompt_token_ids)
        if isinstance(prompts, str):
            prompts = [prompts]
        if self.tokenizer is None:
            raise ValueError(f"{self.model_config.path} has no tokenizer.json; pass "
                             "prompt_token_ids instead of text prompts")
        return [e.ids for e in self.tokenizer.encode_batch(list(prompts))], list(prompts)

    def _output(self, seq: Sequence) -> RequestOutput:
        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_token_ids,
                                         skip_special_tokens=seq.params.skip_special_tokens)
        out = CompletionOutput(0, text, list(seq.output_token_ids), seq.finish_reason)
        return RequestOutput(seq.req_id, seq.prompt, seq.prompt_token_ids, [out], True)

    def close(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

