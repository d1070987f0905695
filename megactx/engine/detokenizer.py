"""Incremental detokenization and stop strings.

Text is decoded from a sliding window of tokens (vLLM's prefix/read offsets) so that multi-byte characters and
tokenizers that merge spaces across tokens decode exactly as a whole decode would, without re-decoding
everything each step. Stop strings are searched in the text, including across token boundaries.
"""
from __future__ import annotations

from megactx.engine.sequence import Sequence

_CONTEXT = 6  # prompt tokens decoded as a prefix, so the first output token gets its leading space right


class IncrementalDetokenizer:
    def __init__(self, tokenizer, seq: Sequence):
        self.tokenizer = tokenizer
        self.skip = seq.params.skip_special_tokens
        self.prefix_offset = max(seq.num_prompt_tokens - _CONTEXT, 0)
        self.read_offset = seq.num_prompt_tokens
        self.max_stop_len = max((len(s) for s in seq.params.stop), default=0)

    def step(self, seq: Sequence) -> None:
        """Append the text of the newest token to seq.output_text; apply stop strings."""
        ids = seq.token_ids
        prefix_text = self.tokenizer.decode(ids[self.prefix_offset:self.read_offset], self.skip)
        new_text = self.tokenizer.decode(ids[self.prefix_offset:], self.skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return  # an incomplete UTF-8 sequence: wait for the next token
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        before = len(seq.output_text)
        seq.output_text += delta
        if seq.params.stop:
            self._check_stop(seq, before)

    def _check_stop(self, seq: Sequence, before: int) -> None:
        text = seq.output_text
        start = max(0, before - self.max_stop_len + 1)
        hits = [(text.find(s, start), s) for s in seq.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return
        i, s = min(hits)
        seq.output_text = text[: i + len(s)] if seq.params.include_stop_str_in_output else text[:i]
        seq.finish_reason, seq.stop_reason = "stop", s

    def stable_text(self, seq: Sequence) -> str:
        """Text that can be streamed: held back while it may still be the start of a stop string."""
        if seq.is_finished or not self.max_stop_len:
            return seq.output_text
        return seq.output_text[: max(0, len(seq.output_text) - self.max_stop_len + 1)]
