"""Text in, samples out: the layer between the id-only engine and its users.

`TextGenerator` holds a loaded model, its tokenizer and an `Engine`. It renders chat
templates, turns finished `Sample`s into `TextSample`s (text cut before any stop string,
EOS dropped from the text but kept in `token_ids`), and streams text deltas with an
incremental UTF-8 decoder so a character split across tokens is never printed broken.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from muestra.engine import Engine, GenerationRequest, Sample, SamplingParams, StepEvent
from muestra.engine.beam import BeamParams, Hypothesis, beam_search
from muestra.engine.seeds import fresh_run_seed
from muestra.models.inspection import prompt_ids, render_chat
from muestra.models.loading import LoadedModel


@dataclass
class TextSample:
    prompt_index: int
    sample: int
    seed: int | None  # None for a beam-search hypothesis: nothing was drawn
    text: str
    token_ids: list[int]
    forced: list[bool]
    finish_reason: str
    stop_reason: int | str | None
    num_prompt_tokens: int
    logprobs: list[dict[str, Any]] | None
    beam: dict[str, float | int] | None = None  # rank, score, sum_logprob

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["num_tokens"] = self.num_tokens
        if self.logprobs is None:
            data.pop("logprobs")
        if self.beam is None:
            data.pop("beam")
        else:
            data.pop("seed")
        if not any(self.forced):
            data.pop("forced")
        return data


class TextGenerator:
    def __init__(self, loaded: LoadedModel, max_batch: int = 64) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.engine = Engine.from_loaded(loaded, max_batch=max_batch)
        assert self.engine.token_bytes is not None
        self.token_bytes = self.engine.token_bytes

    # ---- prompts ------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        """Ids of a piece of text inside a sequence (no special tokens added)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a raw-text prompt: the tokenizer's own special-token rule applies, as in
        HF `generate` and lm-eval (Gemma's tokenizer starts with <bos>, without which the
        base model degenerates; Qwen's and SmolLM2's add nothing)."""
        return prompt_ids(self.tokenizer, text, raw=True)

    def encode_messages(
        self, messages: list[dict[str, Any]], enable_thinking: bool | None = None
    ) -> list[int]:
        return render_chat(self.tokenizer, messages, enable_thinking=enable_thinking)[1]

    # ---- decoding -----------------------------------------------------------------------

    def sample_bytes(self, sample: Sample) -> bytes:
        """The bytes of a sample's visible text: no trailing EOS, nothing from a stop string on."""
        ids = sample.token_ids
        if sample.finish_reason == "stop" and isinstance(sample.stop_reason, int):
            ids = ids[:-1]
        data = b"".join(self.token_bytes[i] for i in ids)
        if sample.stop_byte_offset is not None:
            data = data[: sample.stop_byte_offset]
        return data

    def to_text_sample(self, sample: Sample, prompt_index: int) -> TextSample:
        logprobs = None
        if sample.logprobs is not None:
            logprobs = [self._logprob_dict(lp) for lp in sample.logprobs]
        return TextSample(
            prompt_index=prompt_index,
            sample=sample.sample_index,
            seed=sample.seed,
            text=self.sample_bytes(sample).decode("utf-8", errors="replace"),
            token_ids=sample.token_ids,
            forced=sample.forced,
            finish_reason=sample.finish_reason,
            stop_reason=sample.stop_reason,
            num_prompt_tokens=sample.prompt_length,
            logprobs=logprobs,
        )

    def _piece(self, token_id: int) -> str:
        return self.token_bytes[token_id].decode("utf-8", errors="replace")

    def _logprob_dict(self, lp: Any) -> dict[str, Any]:
        def alternatives(pairs: list[tuple[int, float]]) -> list[dict[str, Any]]:
            return [{"id": i, "token": self._piece(i), "logprob": v} for i, v in pairs]

        return {
            "id": lp.token_id,
            "token": self._piece(lp.token_id),
            "logprob": lp.logprob,
            "raw_logprob": lp.raw_logprob,
            "top": alternatives(lp.top),
            "raw_top": alternatives(lp.raw_top),
        }

    # ---- running ------------------------------------------------------------------------

    def requests(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        n: int = 1,
        params: SamplingParams | None = None,
        max_new_tokens: int = 256,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        logprobs: int | None = None,
    ) -> list[GenerationRequest]:
        run_seed = fresh_run_seed() if seed is None else seed
        return [
            GenerationRequest(
                prompt_ids=list(ids),
                n=n,
                params=params or SamplingParams(),
                max_new_tokens=max_new_tokens,
                seed=run_seed,
                prompt_index=index,
                stop=tuple(stop),
                ignore_eos=ignore_eos,
                logprobs=logprobs,
            )
            for index, ids in enumerate(prompts)
        ]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[TextSample]:
        results = self.engine.generate(requests)
        return [
            self.to_text_sample(sample, requests[i].prompt_index)
            for i, samples in enumerate(results)
            for sample in samples
        ]

    def beam_search(
        self,
        prompts: Sequence[Sequence[int]],
        params: BeamParams,
        *,
        max_new_tokens: int = 256,
        ignore_eos: bool = False,
    ) -> list[TextSample]:
        """The best `params.num_return_sequences` hypotheses of each prompt, best first
        (`sample` is the rank; `beam` holds rank, score and sum_logprob)."""
        requests = [
            GenerationRequest(list(ids), max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
            for ids in prompts
        ]
        results = beam_search(self.engine, requests, params)
        return [
            self._hypothesis_text(h, index, len(prompts[index]))
            for index, hypotheses in enumerate(results)
            for h in hypotheses
        ]

    def _hypothesis_text(self, h: Hypothesis, prompt_index: int, prompt_length: int) -> TextSample:
        ids = h.token_ids
        if h.finish_reason == "stop":
            ids = ids[:-1]  # the EOS stays in token_ids, not in the text
        return TextSample(
            prompt_index=prompt_index,
            sample=h.rank,
            seed=None,
            text=b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace"),
            token_ids=h.token_ids,
            forced=[False] * len(h.token_ids),
            finish_reason=h.finish_reason,
            stop_reason=h.token_ids[-1] if h.finish_reason == "stop" else None,
            num_prompt_tokens=prompt_length,
            logprobs=None,
            beam={"rank": h.rank, "score": h.score, "sum_logprob": h.sum_logprob},
        )

    def stream_text(self, request: GenerationRequest) -> Iterator[tuple[str, TextSample | None]]:
        """(text delta, finished sample or None) for a single-row request, as it decodes.

        Holds back the bytes that could still turn into a stop string, so no part of a
        stop string is ever printed.
        """
        assert request.n == 1, "stream_text follows one sample"
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        hold = max((len(s.encode()) for s in request.stop), default=1) - 1
        data, sent = b"", 0
        event: StepEvent
        for event in self.engine.stream([request]):
            token = event.tokens[0]
            if event.finished:
                sample = event.finished[0]
                final = self.sample_bytes(sample)
                yield (
                    decoder.decode(final[sent:], final=True),
                    self.to_text_sample(sample, request.prompt_index),
                )
                return
            data += self.token_bytes[token.token_id]
            ready = len(data) - hold
            if ready > sent:
                yield decoder.decode(data[sent:ready]), None
                sent = ready
