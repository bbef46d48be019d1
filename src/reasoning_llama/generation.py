"""The inference engine: the project's one generation loop (the CLI, evaluator and server call it).

A fixed KV cache holds `max_batch_size` rows and every running request owns one row (slot).
`Engine.step()` admits waiting requests (one right-padded prefill into their rows), then
decodes one token for every active row at its own position: continuous batching. `generate`,
`generate_batch` and `stream` drive `step()` themselves; the server drives it from one worker.

Turn structure (DESIGN.md §1): the prompt ends with `<|im_start|>reasoning\\n`. When the reasoning
ends (the model emits `<|im_end|>`, or the reasoning budget is spent and the engine emits it), the
engine feeds the assistant header through the model itself and the answer follows, ending at
`<|im_end|>` or `<|endoftext|>`. Each request's `tokenizer.Turn` knows the phase and the forced ids;
the engine only follows it.

Events reach each request's own `on_event` callback whoever steps the engine, and `step()` is
serialised by a lock, so several callers (threads, or interleaved `stream` iterators) can share
one engine without losing each other's events.

Raw mode (`SamplingParams(raw=True)`, plain text continuation) has no turns: the request starts
in the answer phase, so every generated token is answer text, ending at `<|im_end|>` or
`<|endoftext|>` exactly as an answer does; there is no reasoning and no assistant header.

Special ids the sampler may pick: `<|im_end|>` in the reasoning, `<|im_end|>` and `<|endoftext|>`
in the answer. Everything else special (`<|im_start|>`, role ids, `<|PAD|>`, and `<|endoftext|>`
in the reasoning, so a finished generation always has an answer) gets logit -inf, so no special id
ever reaches the text. Stop strings apply to the answer only; they are cut from it and never emitted.

Log-probabilities (`SamplingParams.logprobs`): every sampled id's, from the row the sampler drew it
from after the repetition penalty (and `logits_hook`) and before that special-id mask, at
temperature 1 (`sampling.token_logprobs`). Each travels with the Delta that first carries any of its
text; a sampled end id (`<|im_end|>`, `<|endoftext|>`) with the last Delta of its part; ids cut by
a stop string are dropped with their text. Forced ids have none.

Sampling: each sampled id costs its request one uniform number (`Request.draw`), drawn on the host
from the request's own generator in order, whichever path picks the id (`sampling.pick_rows` on
the host, or the CUDA-graph step on the device, which may draw the next one before the id is
known): a seed gives the same numbers on every path and in every batch, so the same tokens wherever
the logits agree (paths and devices round them differently, which moves a draw near a boundary).
"""

from __future__ import annotations

import codecs
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from reasoning_llama.cpu_layout import prepare_for_cpu_decode, prepare_for_gpu_decode
from reasoning_llama.decoding import DecodeStep, Draws, DynamicDecodeStep, StaticDecodeStep, decode, prefill
from reasoning_llama.errors import ConfigError, RequestError
from reasoning_llama.model import KVCache, Transformer
from reasoning_llama.quantize import int8_linear_works, quantize_int8
from reasoning_llama.sampling import (
    SamplingParams,
    TokenLogprob,
    apply_repetition_penalty,
    draw_uniform,
    mask_unsampled_,
    never_sampled_ids,
    pick_rows,
    token_logprobs,
)
from reasoning_llama.tokenizer import (
    N_VOCAB,
    PAD,
    ChatTokenizer,
    Turn,
    get_tokenizer,
)

__all__ = [
    "Delta",
    "Engine",
    "GenerationResult",
    "Quantize",
    "Request",
    "decode",
    "prefill",
    "resolve_device",
]

FinishReason = Literal["stop", "length", "cancelled"]
Quantize = Literal["int8"]
LogitsHook = Callable[["Request", Tensor], "Tensor | None"]
PROMPT_SCORE_ROWS = 256  # prompt positions scored at once by `Engine.prompt_logprobs`


@dataclass
class Delta:
    """A piece of streamed text: whole UTF-8 characters, never part of a stop string."""

    kind: Literal["reasoning", "answer"]
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the sampled ids behind it (if asked)


@dataclass
class GenerationResult:
    reasoning: str
    answer: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int  # every generated id, the forced assistant header included
    reasoning_tokens: int
    token_ids: list[int]
    well_formed: (
        bool  # reasoning closed, full assistant header, answer closed by an end id (Turn.well_formed)
    )
    timings: dict[str, float] = field(default_factory=dict)
    # With SamplingParams.logprobs: the Deltas' logprobs, by kind ("reasoning", "answer").
    logprobs: dict[str, list[TokenLogprob]] | None = None


# -- requests ------------------------------------------------------------------------------


class _TextStream:
    """Token bytes in, text out: whole UTF-8 characters only; stop strings cut, partial matches held back.

    Items attached to the bytes pushed next (a sampled id's logprob) are released once any of those
    bytes is emitted as text, all at the end, and never when a stop string cut them off.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(stops)
        self._held = ""
        self._bytes_in = 0
        self._bytes_out = 0
        self._attached: deque[tuple[int, TokenLogprob]] = deque()  # (offset of its first byte, item)
        self.text = ""  # everything emitted so far
        self.stopped = False

    def attach(self, item: TokenLogprob) -> None:
        self._attached.append((self._bytes_in, item))

    def released(self, *, final: bool = False) -> list[TokenLogprob]:
        items = []
        while self._attached and (self._attached[0][0] < self._bytes_out or (final and not self.stopped)):
            items.append(self._attached.popleft()[1])
        return items

    def push(self, data: bytes, *, final: bool = False) -> str:
        self._bytes_in += len(data)
        pending = self._held + self._decoder.decode(data, final=final)
        found = [i for i in (pending.find(s) for s in self._stops) if i >= 0]
        if found:
            out, self._held, self.stopped = pending[: min(found)], "", True
        else:
            keep = 0 if final else self._partial_stop_length(pending)
            out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += out
        self._bytes_out += len(out.encode("utf-8", errors="replace"))
        return out

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best


class Request:
    """One generation: the engine's per-request state, written by the engine only (others read it).

    `cancel()` is the one method for other threads. `on_event`, if given, receives every Delta and
    then the GenerationResult, on the thread that steps the engine.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        on_event: Callable[[Delta | GenerationResult], None] | None = None,
    ) -> None:
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.on_event = on_event
        self.turn = Turn(raw=params.raw, reasoning_budget=params.reasoning_budget)
        self.output_ids: list[int] = []
        self.result: GenerationResult | None = None
        self.texts = {"reasoning": _TextStream(()), "answer": _TextStream(params.stop)}
        self.logprobs: dict[str, list[TokenLogprob]] = {"reasoning": [], "answer": []}  # as emitted
        self.generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        self._draws: deque[float] = deque()  # drawn from the generator, not yet spent on a token
        self.seen: Tensor | None = None  # ids in prompt + output, for the repetition penalty
        self.slot: int | None = None  # the cache row while running
        self.times = {"submitted": time.perf_counter()}  # perf_counter readings of its milestones
        self.prefill_s = 0.0
        self._cancel = threading.Event()

    @property
    def phase(self) -> str:
        return self.turn.phase

    @property
    def reasoning_tokens(self) -> int:
        return self.turn.reasoning_tokens

    @property
    def eot_banned(self) -> bool:
        """`<|endoftext|>` may end an answer only (header ids are forced: of the banned, only the reasoning samples)."""
        return self.turn.phase != "answer"

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.result is not None

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def draw(self, ahead: int = 0) -> float:
        """The uniform number the next sampled token is drawn with (`ahead`: the one after that's);
        drawn from the generator once, kept until `spend_draw`. A greedy request draws none (0)."""
        if self.params.greedy:
            return 0.0
        while len(self._draws) <= ahead:
            self._draws.append(draw_uniform(self.generator))
        return self._draws[ahead]

    def spend_draw(self) -> None:
        """A token was picked (not forced) with `draw()`: the next one takes the following number."""
        if not self.params.greedy:
            self._draws.popleft()

    def cancel(self) -> None:
        """Ask the engine to stop this request at its next step (finish_reason "cancelled"); thread-safe."""
        self._cancel.set()

    def __repr__(self) -> str:
        return f"Request({self.id!r}, prompt_tokens={self.prompt_tokens}, generated={len(self.output_ids)})"


# -- the engine ----------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto", *, use_cpu: str = "--device cpu") -> torch.device:
    """ "auto" = CUDA if available, else CPU; refuses a device torch cannot use here, saying how the
    caller's user picks the CPU instead (`use_cpu`: a flag, or a setting like `--set train.device=cpu`)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or mps") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"CUDA is not available on this machine; use {use_cpu}")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"MPS is not available on this machine; use {use_cpu}")
    return resolved


class Engine:
    """Slot-based (continuous batching) generation over one preallocated KV cache.

    `logits_hook(request, logits)` (optional) sees each sampled row's fp32 logits (vocab,) after the
    repetition penalty and before the special-id mask; it may edit them in place or return new ones.
    It is not called for ids the engine forces (the assistant header, a budget's <|im_end|>).

    The decode step (decoding.py): `compile=True` compiles it, the small ops fused, taking seconds
    to tens of seconds: on a CPU ahead of time by AOTInductor, here (aot_step.py; the compiled code
    is cached on disk), elsewhere by torch.compile at the first step.
    `cuda_graphs=True` (a CUDA model) replays it from CUDA graphs captured here for every padded
    batch size up to `max_batch_size`; a batch of requests that are greedy or sampled at a
    temperature alone (no top-k/top-p/min-p, penalty, hook or logprobs) then takes the graph's own
    pick and runs the next step ahead while the host reads this one (decoding.StaticDecodeStep).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: ChatTokenizer,
        *,
        max_batch_size: int = 8,
        device: str | torch.device | None = None,
        logits_hook: LogitsHook | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        config = model.config
        if config.vocab_size < N_VOCAB:
            raise ConfigError(
                f"the model's vocab_size ({config.vocab_size}) is smaller than the tokenizer's {N_VOCAB} ids"
            )
        weight = next(model.parameters())
        self.device = weight.device if device is None else resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_context = config.max_seq_len
        self.logits_hook = logits_hook
        self.cache = KVCache(config, max_batch_size, device=self.device, dtype=weight.dtype)
        if cuda_graphs and self.device.type != "cuda":
            raise ConfigError(f"CUDA graphs need a CUDA device, not {self.device}")
        self.decode_step: DecodeStep
        if cuda_graphs:
            self.decode_step = StaticDecodeStep(self.model, self.cache, cuda_graphs=True, compile=compile)
        elif compile and self.device.type == "cpu":
            from reasoning_llama.aot_step import AOTDecodeStep  # imports inductor (~1 s): only when asked

            self.decode_step = AOTDecodeStep(self.model, self.cache)
        else:
            self.decode_step = DynamicDecodeStep(self.model, self.cache, compile=compile)
        self._never_sampled = torch.tensor(never_sampled_ids(config.vocab_size), device=self.device)
        self._slots: list[Request | None] = [None] * max_batch_size
        self._waiting: deque[Request] = deque()
        self._lock = threading.Lock()  # guards _waiting: add_request may come from other threads
        self._step_lock = threading.Lock()  # one step at a time, whoever drives the loop
        self._ids = itertools.count()

    @classmethod
    def from_checkpoint(
        cls,
        directory: str | Path,
        *,
        device: str | torch.device = "auto",
        max_batch_size: int = 8,
        quantize: Quantize | None = None,
        compile: bool | None = None,
        cuda_graphs: bool | None = None,
    ) -> Engine:
        """Load a checkpoint directory and prepare it for decoding on its device.

        CUDA: bf16 weights and cache when supported, q/k/v and gate/up fused into one product each,
        and the decode step compiled and replayed from CUDA graphs (unless `compile` / `cuda_graphs`
        is False). CPU: the decode layout
        (cpu_layout.py), or with `quantize="int8"` int8 linear layers (quantize.py); the decode
        step compiled only when `compile=True`, as compiling costs more than one reply saves.
        """
        from reasoning_llama.model_files import load_model

        resolved = resolve_device(device)
        if quantize not in (None, "int8"):
            raise ConfigError(f"unknown quantization {quantize!r}; use int8")
        if quantize is not None and resolved.type != "cpu":
            raise ConfigError(
                f"--quantize {quantize} runs on a CPU only (on {resolved.type} the engine uses bf16); use --device cpu"
            )
        if quantize is not None and not int8_linear_works():
            raise ConfigError(
                "this PyTorch build has no dynamic int8 linear kernel (fbgemm); run without --quantize"
            )
        if quantize is not None and compile:
            raise ConfigError("--compile does not apply to int8 weights; drop --compile or --quantize")
        dtype = torch.float32 if quantize else None  # int8 kernels take fp32 activations, whatever was saved
        if resolved.type == "cuda" and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
        model = load_model(directory, device=resolved, dtype=dtype)
        if quantize == "int8":
            quantize_int8(model)
        elif resolved.type == "cpu":
            prepare_for_cpu_decode(model)
        else:  # GPU: q/k/v and gate/up as one product each, 24 products a step instead of 42 for small-100m
            prepare_for_gpu_decode(model)
        cuda = resolved.type == "cuda"
        return cls(
            model,
            get_tokenizer(),
            max_batch_size=max_batch_size,
            device=resolved,
            compile=cuda if compile is None else compile,
            cuda_graphs=cuda if cuda_graphs is None else cuda_graphs,
        )

    # -- requests --------------------------------------------------------------------------
    def room_for_reply(self, prompt_tokens: int, *, param: str = "prompt") -> int:
        """How many tokens a reply to a prompt this long may have; RequestError (naming `param`) if none."""
        room = self.max_context - prompt_tokens
        if room < 1:
            raise RequestError.no_room(prompt_tokens, self.max_context, param)
        return room

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise RequestError for bad sampling values, an empty prompt or one that cannot fit."""
        params.validate()
        if len(prompt_ids) == 0:
            raise RequestError("the prompt is empty; give at least one token", param="prompt")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.model.config.vocab_size:
            raise RequestError(
                f"prompt token ids must be in [0, {self.model.config.vocab_size}); "
                f"got {min(prompt_ids)}..{max(prompt_ids)}",
                param="prompt",
            )
        if len(prompt_ids) + params.max_new_tokens > self.max_context:
            raise RequestError.context_exceeded(
                len(prompt_ids), "max_new_tokens", params.max_new_tokens, self.max_context
            )

    def add_request(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        on_event: Callable[[Delta | GenerationResult], None] | None = None,
    ) -> Request:
        """Queue a request (thread-safe); it joins the running batch at the next step."""
        prompt_ids = [int(i) for i in prompt_ids]
        self.check_request(prompt_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        request = Request(request_id, prompt_ids, params, on_event)
        with self._lock:
            self._waiting.append(request)
        return request

    @torch.inference_mode()
    def prompt_logprobs(self, prompt_ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
        """Each prompt id's log-probability given the ids before it (from the second id on), with its
        `top` most likely alternatives: the model's distribution, no penalty (nothing was sampled).

        One forward pass over the prompt, between steps (it takes the step lock); the head and the
        softmax a slice of positions at a time, as all of a long prompt's scores would take 0.4 GB
        per 1,000 tokens.
        """
        ids = [int(i) for i in prompt_ids]
        self.check_request(ids, SamplingParams(max_new_tokens=1, logprobs=top))
        if len(ids) < 2:
            return []
        scored: list[TokenLogprob] = []
        with self._step_lock:
            hidden = self.model.hidden_states(torch.tensor([ids[:-1]], device=self.device))[0]
            for start in range(0, len(hidden), PROMPT_SCORE_ROWS):
                logits = self.model.head(hidden[start : start + PROMPT_SCORE_ROWS])
                scored += token_logprobs(logits, ids[1 + start : 1 + start + PROMPT_SCORE_ROWS], top)
        return scored

    @property
    def num_active(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return self.num_active > 0 or self.num_waiting > 0

    # -- one step of the loop ---------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[tuple[Request, list[Delta | GenerationResult]]]:
        """Admit waiting requests into free slots, then decode one token for every active slot.

        Returns each request's events of this step (also handed to its `on_event`); a request's last
        event is its GenerationResult. Thread-safe: concurrent callers take turns.
        """
        with self._step_lock:
            events = self._step()
        for request, request_events in events:
            if request.on_event is not None:
                for event in request_events:
                    request.on_event(event)
        return events

    def _step(self) -> list[tuple[Request, list[Delta | GenerationResult]]]:
        events: dict[Request, list[Delta | GenerationResult]] = {}
        self._finish_cancelled(events)
        admitted = self._admit()
        if admitted:
            start = time.perf_counter()
            logits = prefill(
                self.model, self.cache, [r.prompt_ids for r in admitted], [r.slot for r in admitted]
            )
            elapsed = time.perf_counter() - start
            for request in admitted:
                request.prefill_s = elapsed
            if isinstance(self.decode_step, StaticDecodeStep):
                self.decode_step.drop_ahead()
            self._advance(admitted, logits, events)
        active = [r for r in self._slots if r is not None]  # ascending slots
        if active:
            self._decode(active, events)
        return list(events.items())

    def _decode(self, active: list[Request], events: dict) -> None:
        """One token for every active request (rows 0..rows-1 go through the model; free ones idle at slot 0)."""
        rows = active[-1].slot + 1
        tokens, positions = [PAD] * rows, [0] * rows
        for r in active:
            tokens[r.slot] = r.output_ids[-1]
            positions[r.slot] = r.prompt_tokens + len(r.output_ids) - 1
        slots = [r.slot for r in active]
        step = self.decode_step
        if not isinstance(step, StaticDecodeStep) or not self._picked_in_step(active):
            self._advance(active, step(tokens, positions, slots), events)
            return
        draws = Draws.all_greedy(rows)
        for r in active:
            draws.eot_banned[r.slot] = int(r.eot_banned)
            if not r.params.greedy:
                draws.temperatures[r.slot] = r.params.temperature
            draws.uniforms[r.slot], draws.next_uniforms[r.slot] = r.draw(), r.draw(ahead=1)
        # Every id comes from the step's own pick (or is forced): the host reads ids, not logits.
        # The next step may run ahead while the host does its bookkeeping, unless this step forces
        # an id, or a request reaches its length, when either every request ends or, with requests
        # waiting (the slots are full, or they would have been admitted), one joins.
        forced = [r.turn.forced for r in active]
        ending = [len(r.output_ids) + 1 >= r.params.max_new_tokens for r in active]
        may_run_ahead = (
            all(f is None for f in forced) and not all(ending) and not (self._waiting and any(ending))
        )
        chosen = step.pick(tokens, positions, slots, draws, may_run_ahead=may_run_ahead)
        for r, f, token in zip(active, forced, chosen, strict=True):
            if f is None:
                r.spend_draw()
            self._accept(r, token if f is None else f, events.setdefault(r, []))

    def _picked_in_step(self, requests: list[Request]) -> bool:
        """Whether the step's own pick is all these requests need: greedy, or sampled at a
        temperature alone (no top-k/top-p/min-p), with no penalty, hook or logprobs."""
        return self.logits_hook is None and all(
            (r.params.greedy or not r.params.filtered) and r.seen is None and r.params.logprobs is None
            for r in requests
        )

    def _finish_cancelled(self, events: dict) -> None:
        for request in [r for r in self._slots if r is not None and r.cancelled]:
            self._finish(request, "cancelled", events.setdefault(request, []))
        with self._lock:
            cancelled = [r for r in self._waiting if r.cancelled]
            for request in cancelled:
                self._waiting.remove(request)
        for request in cancelled:
            self._finish(request, "cancelled", events.setdefault(request, []))

    def _admit(self) -> list[Request]:
        admitted = []
        with self._lock:
            for slot in range(self.max_batch_size):
                if not self._waiting:
                    break
                if self._slots[slot] is None:
                    request = self._waiting.popleft()
                    request.slot = slot
                    self._slots[slot] = request
                    admitted.append(request)
        now = time.perf_counter()
        for request in admitted:
            request.times["admitted"] = now
            if request.params.repetition_penalty != 1.0:
                request.seen = torch.zeros(self.model.config.vocab_size, dtype=torch.bool, device=self.device)
                request.seen[torch.tensor(request.prompt_ids, device=self.device)] = True
        return admitted

    def _advance(self, requests: list[Request], logits: Tensor, events: dict) -> None:
        """Pick the next id of every request (forced or sampled) and act on it."""
        tokens, logprobs = self._choose(requests, logits)
        for request, token, logprob in zip(requests, tokens, logprobs, strict=True):
            self._accept(request, token, events.setdefault(request, []), logprob)

    def _choose(self, requests: list[Request], logits: Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        forced = [r.turn.forced for r in requests]
        for i, r in enumerate(requests):
            if forced[i] is not None:
                continue
            if r.seen is not None:
                logits[i] = apply_repetition_penalty(logits[i], r.seen, r.params.repetition_penalty)
            if self.logits_hook is not None:
                hooked = self.logits_hook(r, logits[i])
                if hooked is not None:
                    logits[i] = hooked
        reported = [i for i, r in enumerate(requests) if forced[i] is None and r.params.logprobs is not None]
        unmasked = logits[reported] if reported else None  # a copy: logprobs come from before the mask
        eot_banned = torch.tensor([r.eot_banned for r in requests], device=self.device)
        mask_unsampled_(logits, self._never_sampled, eot_banned)
        free = [i for i in range(len(requests)) if forced[i] is None]
        tokens = [forced[i] for i in range(len(requests))]
        if free:
            rows = logits if len(free) == len(requests) else logits[torch.tensor(free, device=self.device)]
            params = [requests[i].params for i in free]
            drawn = pick_rows(rows, params, [requests[i].draw() for i in free])
            for i, token in zip(free, drawn, strict=True):
                tokens[i] = token
                requests[i].spend_draw()
        logprobs: list[TokenLogprob | None] = [None] * len(requests)
        if unmasked is not None:
            tops = [requests[i].params.logprobs or 0 for i in reported]
            entries = token_logprobs(unmasked, [tokens[i] for i in reported], max(tops))
            for i, top, entry in zip(reported, tops, entries, strict=True):
                entry.top = entry.top[:top]
                logprobs[i] = entry
        return tokens, logprobs

    def _accept(
        self, r: Request, token: int, out: list[Delta | GenerationResult], logprob: TokenLogprob | None = None
    ) -> None:
        if logprob is not None:
            r.texts["reasoning" if r.turn.phase == "reasoning" else "answer"].attach(logprob)
        r.output_ids.append(token)
        r.times.setdefault("first_token", time.perf_counter())
        if r.seen is not None:
            r.seen[token] = True
        was_reasoning = r.turn.phase == "reasoning"
        kind = r.turn.feed(token)
        if kind is not None:
            self._emit(r, kind, self.tokenizer.token_bytes(token), out)
        if was_reasoning and r.turn.phase != "reasoning":
            self._emit(r, "reasoning", b"", out, final=True)
        if r.turn.phase == "done" or r.texts["answer"].stopped:
            return self._finish(r, "stop", out)
        if len(r.output_ids) >= r.params.max_new_tokens:
            self._finish(r, "length", out)

    @staticmethod
    def _emit(r: Request, kind: str, data: bytes, out: list, *, final: bool = False) -> None:
        stream = r.texts[kind]
        text = stream.push(data, final=final)
        logprobs = stream.released(final=final)
        if text:
            r.times.setdefault("first_text", time.perf_counter())
        if text or logprobs:  # an end id's logprob may come without text
            r.logprobs[kind] += logprobs
            out.append(Delta(kind, text, logprobs))  # type: ignore[arg-type]

    def _finish(self, r: Request, reason: FinishReason, out: list[Delta | GenerationResult]) -> None:
        for kind, stream in r.texts.items():
            if not stream.stopped:
                self._emit(r, kind, b"", out, final=True)
        if r.slot is not None:
            self._slots[r.slot] = None
            r.slot = None
        now = time.perf_counter()
        times = r.times
        first = times.get("first_token", now)
        decode_s = now - first
        timings = {
            "queue_s": times.get("admitted", now) - times["submitted"],
            "prefill_s": r.prefill_s,
            "time_to_first_token_s": first - times["submitted"],
            "decode_s": decode_s,
            "decode_tokens_per_s": (len(r.output_ids) - 1) / decode_s if decode_s > 0 else 0.0,
            "total_s": now - times["submitted"],
        }
        if "first_text" in times:
            timings["time_to_first_text_s"] = times["first_text"] - times["submitted"]
        r.result = GenerationResult(
            reasoning=r.texts["reasoning"].text,
            answer=r.texts["answer"].text,
            finish_reason=reason,
            prompt_tokens=r.prompt_tokens,
            completion_tokens=len(r.output_ids),
            reasoning_tokens=r.reasoning_tokens,
            token_ids=list(r.output_ids),
            well_formed=r.turn.well_formed,
            timings=timings,
            logprobs=None if r.params.logprobs is None else r.logprobs,
        )
        out.append(r.result)

    # -- conveniences that drive the loop themselves ------------------------------------------
    def stream(
        self, prompt_ids: Sequence[int], params: SamplingParams, *, cancel: threading.Event | None = None
    ) -> Iterator[Delta | GenerationResult]:
        """Deltas as they are decoded, then the GenerationResult. Setting `cancel` stops it between tokens.

        Other callers may drive the same engine meanwhile: this request's events reach this iterator
        whoever steps.
        """
        events: deque[Delta | GenerationResult] = deque()
        request = self.add_request(prompt_ids, params, on_event=events.append)
        try:
            while True:
                while events:
                    event = events.popleft()
                    yield event
                    if isinstance(event, GenerationResult):
                        return
                if cancel is not None and cancel.is_set():
                    request.cancel()
                self.step()
        finally:
            if not request.finished:  # the consumer stopped early: free the slot
                request.cancel()
                self.step()

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> GenerationResult:
        *_, result = self.stream(prompt_ids, params or SamplingParams())
        assert isinstance(result, GenerationResult)
        return result

    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: bool = False,
    ) -> list[GenerationResult]:
        """Generate for every prompt (continuous batching underneath); results in input order."""
        if params is None or isinstance(params, SamplingParams):
            per_prompt = [params or SamplingParams()] * len(prompts)
        else:
            per_prompt = list(params)
            if len(per_prompt) != len(prompts):
                raise RequestError(f"got {len(prompts)} prompts but {len(per_prompt)} SamplingParams")
        for prompt, p in zip(prompts, per_prompt, strict=True):
            self.check_request(prompt, p)  # every request is checked before any work starts
        from tqdm.auto import tqdm

        requests = [self.add_request(prompt, p) for prompt, p in zip(prompts, per_prompt, strict=True)]
        with tqdm(total=len(requests), desc="generating", unit="req", disable=not progress) as bar:
            pending = set(requests)
            while pending:
                for request, _ in self.step():
                    if request in pending and request.finished:
                        pending.discard(request)
                        bar.update(1)
        return [r.result for r in requests]  # type: ignore[misc]
