"""Token estimates for context budgeting: about four characters a token, as the OpenAI
tokenizers average on English, plus a per-message overhead. Cheap enough for the hot path;
the budget keeps a margin for the error."""

from __future__ import annotations

from typing import Any

MESSAGE_OVERHEAD = 4


def estimate_text(text: str) -> int:
    return (len(text) + 3) // 4


def estimate_message(message: dict[str, Any]) -> int:
    tokens = MESSAGE_OVERHEAD
    content = message.get("content")
    if isinstance(content, str):
        tokens += estimate_text(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                value = part.get("text")
                tokens += estimate_text(value) if isinstance(value, str) else 85  # an image
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        tokens += 8 + estimate_text(function.get("name", "")) + estimate_text(
            function.get("arguments", "")
        )
    return tokens
