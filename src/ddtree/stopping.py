"""When to stop, and which text is safe to show: end tokens, stop strings and the token limit.

Tokens arrive in bursts (a whole accepted path per round). The checker takes a burst, keeps the
tokens up to the first stop, and returns the text that can no longer change: text that might be
the beginning of a stop string, or half of a multi-byte character, is held back until it settles.
"""

from __future__ import annotations

from .results import StreamChunk


class StopChecker:
    def __init__(self, tokenizer, eos_token_ids: set[int], stop_strings: list[str], max_new_tokens: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.stop_strings = [s for s in stop_strings if s]
        self.max_new_tokens = max_new_tokens
        self.tokens: list[int] = []
        self.shown = 0  # characters of text already returned

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.tokens)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def push(self, new_tokens: list[int]) -> StreamChunk:
        """Takes a burst of generated tokens; returns those kept, the settled text and why it stopped."""
        kept, reason = [], None
        for token in new_tokens[: self.remaining]:
            kept.append(token)
            if token in self.eos_token_ids:
                reason = "stop"
                break
        self.tokens += kept
        text = self.decode(self.tokens)
        cut = self.find_stop(text)
        if cut is not None:
            reason = "stop"
            # Drop every token after the one that completed the stop string.
            while kept and self.find_stop(self.decode(self.tokens[:-1])) is not None:
                self.tokens.pop()
                kept.pop()
            text = text[:cut]
        if reason is None and self.remaining <= 0:
            reason = "length"
        return StreamChunk(kept, self.settle(text, final=reason is not None), reason)

    def finish(self, reason: str) -> StreamChunk:
        """Ends generation for a reason found outside the tokens (the context is full)."""
        return StreamChunk([], self.settle(self.decode(self.tokens), final=True), reason)

    def find_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None

    def settle(self, text: str, final: bool) -> str:
        end = len(text)
        if not final:
            end = len(text.rstrip("\ufffd"))  # a character whose bytes have not all arrived yet
            for stop in self.stop_strings:  # a tail that could still grow into a stop string
                for size in range(min(len(stop) - 1, end), 0, -1):
                    if text[end - size:end] == stop[:size]:
                        end -= size
                        break
        delta = text[self.shown:max(end, self.shown)]
        self.shown = max(end, self.shown)
        return delta
