"""When to stop, and which text is safe to show: end tokens, stop strings and the token limit.

Tokens arrive in bursts (a whole accepted path per round). The checker takes a burst, keeps the
tokens up to the first stop, and returns the text that can no longer change: text that might be
the beginning of a stop string, or half of a multi-byte character, is held back until it settles.
"""

from __future__ import annotations

from .results import StreamChunk


# Tokens before the new ones that the incremental decode reads again: enough for a tokenizer's clean-up or
# a leading space to see what came before.
WINDOW_TOKENS = 4


class StopChecker:
    def __init__(self, tokenizer, eos_token_ids: set[int], stop_strings: list[str], max_new_tokens: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.stop_strings = [s for s in stop_strings if s]
        self.max_new_tokens = max_new_tokens
        self.tokens: list[int] = []
        self.shown = 0  # characters of text already returned
        # decode(tokens), kept incrementally: tokens[:read] decode to `settled`, and new tokens are decoded
        # in a window from `window` on (a few tokens before them, whose text the window's own decode
        # shares), so a push costs its burst, not the whole answer (a server decodes many at once)
        self.settled, self.read, self.window = "", 0, 0

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.tokens)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def text(self) -> str:
        """decode(self.tokens), decoding only the tokens since the last call and a few before them. The text
        they add is the window's decode past the text it had before them; where that is not how the
        window's text grew (a tokenizer that rewrote text before them), the whole answer is decoded."""
        before = self.decode(self.tokens[self.window:self.read])
        after = self.decode(self.tokens[self.window:])
        if not after.startswith(before):
            self.settled, self.read = self.decode(self.tokens), len(self.tokens)
            self.window = max(0, self.read - WINDOW_TOKENS)
            return self.settled
        added = after[len(before):]
        if added.endswith("\ufffd"):  # a character's bytes still arriving: decoded again next time
            return self.settled + added
        self.settled += added
        self.read = len(self.tokens)
        self.window = max(0, self.read - WINDOW_TOKENS)
        return self.settled

    def push(self, new_tokens: list[int]) -> StreamChunk:
        """Takes a burst of generated tokens; returns those kept, the settled text and why it stopped."""
        kept, reason = [], None
        for token in new_tokens[: self.remaining]:
            kept.append(token)
            if token in self.eos_token_ids:
                reason = "stop"
                break
        self.tokens += kept
        text = self.text()
        cut = self.find_stop(text)
        if cut is not None:
            reason = "stop"
            # Drop every token after the one that completed the stop string.
            while kept and self.find_stop(self.decode(self.tokens[:-1])) is not None:
                self.tokens.pop()
                kept.pop()
            self.settled, self.read, self.window = "", 0, 0  # (tokens went: decoded afresh if asked again)
            text = text[:cut]
        if reason is None and self.remaining <= 0:
            reason = "length"
        return StreamChunk(kept, self.settle(text, final=reason is not None), reason)

    def finish(self, reason: str) -> StreamChunk:
        """Ends generation for a reason found outside the tokens (the context is full)."""
        return StreamChunk([], self.settle(self.text(), final=True), reason)

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
