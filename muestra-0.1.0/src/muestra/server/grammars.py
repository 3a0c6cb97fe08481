"""Request grammars (`response_format`), compiled off the event loop and within bounds.

A grammar sent by a client is refused (413) when its canonical text is larger than
`--max-grammar-bytes`; otherwise it compiles in one dedicated worker thread, so the event
loop (and `/health`) never waits on xgrammar, and a cold compile that does not finish
within `--grammar-timeout` seconds, waiting in line included, is a 400 naming the flag.
Cached grammars (the backend keeps the most recently used ones, up to
`--grammar-cache-mb`) return at once without queueing.

A thread cannot be killed: a compile that timed out keeps the worker until it ends, and
the compiles queued behind it time out in turn instead of piling up, since only one
runs at a time. With xgrammar 0.2.9 no grammar within the default size limit was found
that compiles for long (measured on the Qwen3 vocabulary: 20,000 regex alternatives
0.5 s, 500 `anyOf` objects 0.09 s, 1,000 required properties 0.08 s, `[a-z]{0,10**7}`
0.3 s), so the timeout is a backstop, not the first line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from muestra.answers.grammar import GrammarBackend, GrammarSpec
from muestra.errors import InputError
from muestra.server.protocol import ApiError

DEFAULT_MAX_GRAMMAR_BYTES = 64 * 1024
DEFAULT_GRAMMAR_TIMEOUT = 10.0


class GrammarGate:
    def __init__(
        self,
        backend: Callable[[], GrammarBackend],  # builds it (once) on first use
        max_bytes: int = DEFAULT_MAX_GRAMMAR_BYTES,
        timeout: float = DEFAULT_GRAMMAR_TIMEOUT,
    ) -> None:
        self._build = backend
        self.backend: GrammarBackend | None = None
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="muestra-grammar")

    def check_size(self, spec: GrammarSpec, param: str) -> None:
        size = len(spec.source.encode())
        if size > self.max_bytes:
            raise ApiError(
                413,
                f"{param}: the grammar is {size:,} bytes, above this server's limit of "
                f"{self.max_bytes:,} (--max-grammar-bytes)",
                param=param,
                code="grammar_too_large",
            )

    async def compile(self, spec: GrammarSpec, param: str) -> tuple[GrammarBackend, Any]:
        """The backend and the compiled grammar; ApiError when refused or too slow."""
        self.check_size(spec, param)
        loop = asyncio.get_running_loop()
        if self.backend is None:  # built on first use: building reads the whole vocabulary
            self.backend = await loop.run_in_executor(self._worker, self._build)
        backend = self.backend
        try:
            if backend.cached(spec):
                return backend, backend.compile(spec)
            work = loop.run_in_executor(self._worker, backend.compile, spec)
            compiled = await asyncio.wait_for(work, self.timeout)
        except TimeoutError as err:
            raise ApiError(
                400,
                f"{param}: the grammar did not compile within {self.timeout:g} s "
                "(--grammar-timeout); simplify it",
                param=param,
                code="grammar_timeout",
            ) from err
        except InputError as err:
            raise ApiError(400, str(err), param=param) from err
        return backend, compiled

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
