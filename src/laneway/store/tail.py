"""The newest messages of a session, with running token sums, so that finding the context
window is a binary search rather than a walk over the transcript on every turn, and with
each message's JSON encoded once, so a turn's request to the model copies bytes instead of
serialising the whole window again."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from typing import TYPE_CHECKING

import orjson

from laneway.errors import ContextTooLong

if TYPE_CHECKING:  # the store's own type; base.py imports this module
    from laneway.store.base import Message


class Tail:
    __slots__ = ("messages", "encoded", "_cum", "_users", "_user_cum")

    def __init__(self, messages: Iterable[Message] = (), tokens: Iterable[int] = ()) -> None:
        self._reset(messages, tokens)

    def _reset(self, messages: Iterable[Message], tokens: Iterable[int]) -> None:
        #: The messages as the model sees them, oldest first, and the same as JSON.
        self.messages: list[Message] = []
        self.encoded: list[orjson.Fragment] = []
        self._cum = [0]  # _cum[i]: tokens of messages[:i]
        self._users: list[int] = []  # indices of user messages: where a window may start
        self._user_cum: list[int] = []  # _cum at each of them (sorted, for bisect)
        self.extend(messages, tokens)

    def extend(
        self,
        messages: Iterable[Message],
        tokens: Iterable[int],
        encoded: Iterable[orjson.Fragment | bytes | str | None] | None = None,
    ) -> None:
        """Append messages; `encoded` gives their JSON where the caller has it already."""
        known = encoded if encoded is not None else iter(lambda: None, 0)
        for message, n, raw in zip(messages, tokens, known):
            if message.get("role") == "user":
                self._users.append(len(self.messages))
                self._user_cum.append(self._cum[-1])
            self.messages.append(message)
            if raw is None:  # as `str`: orjson's `bytes` keep a buffer of 4 KiB or more
                raw = orjson.dumps(message).decode()
            self.encoded.append(raw if isinstance(raw, orjson.Fragment) else orjson.Fragment(raw))
            self._cum.append(self._cum[-1] + n)

    @property
    def tokens(self) -> int:
        return self._cum[-1]

    def __len__(self) -> int:
        return len(self.messages)

    def _start_within(self, budget: int) -> int:
        """The earliest user message from which the rest fits `budget` (len if none)."""
        k = bisect_left(self._user_cum, self._cum[-1] - budget)
        return self._users[k] if k < len(self._users) else len(self.messages)

    def cut(self, budget: int, must_start_by: int | None = None) -> int:
        """Where the window starts: the newest whole turns that fit `budget` tokens. A cut
        only falls just before a user message, so no tool result is separated from its
        call. `must_start_by` (an index) must be inside the window: an open tool call."""
        cut = self._start_within(budget)
        if must_start_by is not None and cut > must_start_by:
            k = bisect_right(self._users, must_start_by) - 1
            cut = self._users[k] if k >= 0 else 0
            if self._cum[-1] - self._cum[cut] > budget:
                raise ContextTooLong("the open tool call no longer fits the context budget")
        return cut

    def window(self, budget: int, must_start_by: int | None = None) -> list[Message]:
        return self.messages[self.cut(budget, must_start_by) :]

    def tokens_from(self, cut: int) -> int:
        return self._cum[-1] - self._cum[cut]

    def trim(self, keep_tokens: int) -> None:
        """Forget the oldest messages down to `keep_tokens`, cutting before a user message."""
        cut = self._start_within(keep_tokens)
        if 0 < cut < len(self.messages):
            messages, encoded = self.messages[cut:], self.encoded[cut:]
            tokens = [b - a for a, b in zip(self._cum[cut:], self._cum[cut + 1 :])]
            self._reset((), ())
            self.extend(messages, tokens, encoded)
