"""Offline inference: LLM(model).generate(prompts, params) and LLM(model).chat(messages, params)."""
from __future__ import annotations

from typing import Any, Callable, Sequence as Seq

from megactx.config import EngineConfig
from megactx.engine.llm_engine import LLMEngine
from megactx.outputs import RequestOutput
from megactx.sampling import SamplingParams

Messages = list[dict[str, Any]]


class LLM:
    """model: a Hugging Face directory or a .gguf file; None = the bundled SmolLM2-135M-Instruct.

    Keyword arguments are the engine's settings by their flag names (megactx/config), e.g.
    LLM(path, max_model_len=8192, max_num_batched_tokens=2048, kv_cache_dtype="bf16", dca=True, sparse_mass=0.8);
    or pass a whole EngineConfig as config=.
    """

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **kwargs):
        if config is None:
            config = EngineConfig.from_kwargs(model, **kwargs)
        elif model is not None or kwargs:
            raise TypeError("LLM: give either config= or the model and keyword settings, not both")
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 on_step: Callable[[list[RequestOutput]], None] | None = None) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); outputs in prompt order. params: one for all prompts, or
        one per prompt (as vLLM takes them)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        each = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(each) != len(prompts):
            raise ValueError(f"{len(each)} sampling params for {len(prompts)} prompts; give one, or one per prompt")
        ids = [self.engine.add_request(p, q) for p, q in zip(prompts, each)]
        return self._run(ids, on_step)

    def chat(self, messages: Messages | list[Messages], params: SamplingParams | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             on_step: Callable[[list[RequestOutput]], None] | None = None) -> list[RequestOutput]:
        """Apply the chat template to one conversation (or a list of them) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode_chat(m, add_generation_prompt=add_generation_prompt,
                                              continue_final_message=continue_final_message)
                   for m in conversations]
        return self.generate(prompts, params, on_step)

    def _run(self, request_ids: list[str], on_step) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        try:
            while len(final) < len(request_ids):
                outputs = self.engine.step()
                for rid, error in self.engine.failures:
                    if rid in request_ids:
                        raise RuntimeError(f"request {rid}: sampling failed: {error}") from error
                self.engine.failures.clear()
                if on_step:
                    on_step(outputs)
                for out in outputs:
                    if out.finished:
                        final[out.request_id] = out
        finally:
            for rid in request_ids:
                if rid not in final:
                    self.engine.abort(rid)
        return [final[r] for r in request_ids]
