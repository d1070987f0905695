"""Tokenizers and chat templates, through transformers (tokenizers backend).

A GGUF file carries its vocabulary, merges and chat template in its metadata; transformers converts them to a
fast tokenizer, which takes seconds for a 49K-token BPE vocabulary, so the converted tokenizer is cached on
disk keyed by a hash of the tokenizer metadata.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

from megactx.errors import ModelLoadError, RequestError

logger = logging.getLogger(__name__)


def cache_dir() -> str:
    return os.environ.get("MEGACTX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "megactx"))


class Tokenizer:
    def __init__(self, hf_tokenizer, eos_token_ids: list[int] | None = None):
        self.hf = hf_tokenizer
        ids = list(eos_token_ids or [])
        if hf_tokenizer.eos_token_id is not None and hf_tokenizer.eos_token_id not in ids:
            ids.append(hf_tokenizer.eos_token_id)
        self.eos_token_ids = ids

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    @property
    def supports_tools(self) -> bool:
        """The chat template renders a `tools` list (Qwen2.5's, Llama 3.1's, Hermes' do)."""
        template = getattr(self.hf, "chat_template", None) or ""
        return "tools" in (template if isinstance(template, str) else str(template))

    @property
    def kind(self) -> str:
        return type(self.hf).__name__

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(ids)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, **kwargs) -> str:
        """Render messages to the prompt text (special tokens included as text; encode without adding more)."""
        if not self.has_chat_template:
            raise RequestError("this model's tokenizer has no chat template; use the completions API with a plain prompt")
        if continue_final_message:
            if not messages or messages[-1].get("role") != "assistant":
                raise RequestError("continue_final_message needs the last message to be from the assistant")
            add_generation_prompt = False
        try:
            return self.hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, **kwargs)
        except Exception as e:  # jinja errors, template-raised exceptions
            raise RequestError(f"the chat template rejected these messages: {e}") from None

    def encode_chat(self, messages, **kwargs) -> list[int]:
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)


def gguf_tokenizer_key(path: str) -> str:
    """A hash of the tokenizer's own metadata entries (their bytes as stored), so that files sharing a tokenizer
    share one converted copy."""
    from megactx.loader.gguf import read_gguf
    spans = read_gguf(path).spans
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for name in sorted(k for k in spans if k.startswith("tokenizer.")):
            start, end = spans[name]
            f.seek(start)
            h.update(name.encode())
            h.update(f.read(end - start))
    return h.hexdigest()[:16]


def load_tokenizer(model_path: str, eos_token_ids: list[int] | None = None) -> Tokenizer:
    import transformers
    transformers.logging.set_verbosity_error()
    from transformers import AutoTokenizer
    if os.path.isdir(model_path):
        try:
            tok = AutoTokenizer.from_pretrained(model_path)
        except Exception as e:
            raise ModelLoadError(f"{model_path}: cannot load a tokenizer (tokenizer.json / tokenizer_config.json): {e}") from None
        return Tokenizer(tok, eos_token_ids)
    key = gguf_tokenizer_key(model_path)
    cached = os.path.join(cache_dir(), "tokenizers", key)
    if os.path.isfile(os.path.join(cached, "tokenizer.json")):
        return Tokenizer(AutoTokenizer.from_pretrained(cached), eos_token_ids)
    logger.info("converting the GGUF tokenizer of %s (once; cached in %s)", model_path, cached)
    folder, name = os.path.split(os.path.abspath(model_path))
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:
        raise ModelLoadError(f"{model_path}: cannot build a tokenizer from the GGUF metadata: {e}") from None
    try:
        os.makedirs(cached, exist_ok=True)
        tok.save_pretrained(cached)
    except OSError as e:  # a read-only home is not fatal: the conversion is repeated next time
        logger.warning("cannot cache the tokenizer in %s: %s", cached, e)
    return Tokenizer(tok, eos_token_ids)
