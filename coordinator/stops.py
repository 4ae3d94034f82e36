"""Stop strings: a sequence stops once its decoded text holds one of them, and its text is cut there.

Only the tail of the generated tokens is decoded at each step (enough tokens to hold the longest stop
string several times over), so checking costs the same at token 10 and token 1000.
"""

from __future__ import annotations

from typing import Callable, Sequence


class StopStrings:
    def __init__(self, strings: Sequence[str], decode: Callable[[list[int]], str]) -> None:
        self.strings = tuple(strings)
        self._decode = decode
        self._tail = 2 * max(len(s) for s in self.strings) + 4  # a token decodes to at least one character

    def __call__(self, generated: Sequence[int]) -> bool:
        """Whether the text of ``generated`` holds a stop string that ends in its last token."""
        text = self._decode(list(generated[-self._tail:]))
        return any(s in text for s in self.strings)

    def cut(self, text: str) -> str:
        """``text`` up to (without) its first stop string."""
        found = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return text[:min(found)] if found else text
