"""Continuous batching: the answers being written at the same time are decoded together, one step for all.

A decode step reads every weight once, whether it computes one conversation's next token or eight
(`benchmarks/load.py` measures what that buys), so `Batcher` runs every computation of a backend on
one thread: a new question's prompt (past a cached prefix) is computed in one pass with the running
answers' next step where the backend can (`Rows.start`), and it joins the batch at that token boundary;
an answer leaves as soon as it ends (end of text, its length limit, or its
visitor stopped), its KV cache kept for a follow-up question. A question joins only while a slot is
free and the batch's KV, every row at its length limit, fits (a question alone always starts);
otherwise it waits for rows to leave. Tokens are chosen here, as transformers' generate does.

What the batch's KV caches are and how a step computes is the model's side, `Rows`:
`inference.backends.pytorch.TorchRows` for PyTorch, `inference.backends.llamacpp.LlamaCppRows` for llama.cpp.
Each row computes what it would alone (tests/test_batching.py holds greedy answers equal).

The batcher's thread is its backend's one computing thread: the loaders run the model's loading there
(`call`), and images and speech go there too. torch's OpenMP runtime (libgomp) keeps a pool of workers for
every thread that has run a parallel operation, and once the process has more of them than CPUs it stops
letting idle workers spin: each of the thousands of parallel operations of a decode step then waits for a
sleeping worker to be woken. A decode step on a second thread, after the model was loaded on the first, is
much slower (`benchmarks/computing_thread.py` measures it).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

from inference.config import GenerationOptions
from inference.model import next_token

T = TypeVar("T")


@dataclass(eq=False)
class Answer:
    """One question being answered: its prompt, how to choose tokens, where they go, and its place in the batch."""

    input_ids: list[int]
    image_embeds: torch.Tensor | None
    image_key: object
    options: GenerationOptions
    streamer: object | None
    stop: threading.Event | None
    tokens: list[int] = field(default_factory=list)
    positions: int = 0  # positions in its KV cache (the prompt, then every token fed back)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def choose(self, logits: torch.Tensor, eos: int) -> bool:
        """Pick the next token from the last position's `logits` (vocabulary,) as transformers' generate does for
        these options; hand it on. Returns whether the answer is complete."""
        token = next_token(logits, self.tokens, self.options)
        self.tokens.append(token)
        if self.streamer is not None:
            self.streamer.put(torch.tensor([token]))
        return token == eos or len(self.tokens) >= self.options.max_new_tokens

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()


@dataclass(eq=False)
class Job:
    """Other work on the batcher's thread (loading the model, computing a prefix ahead, encoding an image,
    transcribing speech), run between two decode steps."""

    run: Callable[[], object]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    result: object = None


class Rows(Protocol):
    """A model's side of continuous batching: the KV caches of the answers `Batcher` decodes together. Every
    method is called on the batcher's thread. The PyTorch and llama.cpp backends each have theirs."""

    def fits(self, answers: list[Answer]) -> bool:
        """Whether these answers' KV, each at its length limit, fits in memory together."""

    def start(self, answer: Answer, running: list[Answer]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Compute `answer`'s prompt, past whatever prefix of it is cached: the last position's logits; and, in the
        same pass or not (None), the `running` answers' next step (`step`'s logits). Raising, it leaves the running
        answers as they were."""

    def enter(self, answer: Answer, running: list[Answer]) -> None:
        """`answer` (started) joins the `running` ones' batch."""

    def step(self, running: list[Answer]) -> torch.Tensor:
        """Feed each running answer its newest token at its next position: logits (rows, vocabulary)."""

    def leave(self, complete: list[Answer], running: list[Answer]) -> None:
        """`complete` (some of `running`) leave the batch; each one's KV is kept for a follow-up question:
        prompt and answer, the last token not fed."""

    def set_aside(self, answer: Answer, keep: bool) -> None:
        """`answer`, started, never enters: complete at once (its KV kept, `keep`) or failed as it started."""

    def reset(self) -> None:
        """Forget the batch after an error."""


class Batcher:
    """Decodes up to `slots` answers together on one thread; `generate` and `call` are called from any number of
    threads. `rows` may be given after the model is loaded (by a `call`), before the first `generate`."""

    def __init__(self, rows: Rows | None = None, slots: int = 8, eos_token_id: int | None = None):
        self.rows, self.slots, self.eos_token_id = rows, slots, eos_token_id
        self.waiting: deque[Answer | Job] = deque()
        self.running: list[Answer] = []
        self.condition = threading.Condition()
        self.thread: threading.Thread | None = None

    def generate(
        self,
        input_ids: Sequence[int],
        image_embeds: torch.Tensor | None,
        options: GenerationOptions | None = None,
        streamer=None,
        stop: threading.Event | None = None,
        image_key: str = "",
    ) -> list[int]:
        """`MultimodalPhi.generate`'s answer (the new ids, EOS included if it stopped there), decoded in a batch
        with whatever else is being answered."""
        # An unnamed image gets a key equal to no other, so its positions are never taken for another's.
        answer = Answer(
            list(input_ids), image_embeds, image_key or object(), options or GenerationOptions(), streamer, stop
        )
        self._wait(answer)
        return answer.tokens

    def call(self, run: Callable[[], T]) -> T:
        """`run()` on the batching thread between two steps (so no two computations compete for the cores)."""
        if self.thread is threading.current_thread():  # called from a job: already there
            return run()
        job = Job(run)
        self._wait(job)
        return job.result

    def _wait(self, item: Answer | Job) -> None:
        with self.condition:
            self.waiting.append(item)
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
                self.thread.start()
            self.condition.notify()
        item.done.wait()
        if item.error is not None:
            raise item.error

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.waiting and not self.running:
                    self.condition.wait()
                # Work ahead (a `Job`) never waits for a slot; a question waits until an answer leaves.
                ready = self.waiting and (isinstance(self.waiting[0], Job) or self._fits(self.waiting[0]))
                item = self.waiting.popleft() if ready else None
            if isinstance(item, Job):
                try:
                    item.result = item.run()
                except BaseException as error:
                    item.error = error
                item.done.set()
                continue
            try:
                stepped = item is not None and self._join(item)
                if self.running and not stepped:
                    self._step()
            except BaseException as error:  # out of memory, say: every running answer's caller hears of it
                self._fail(error)

    def _fits(self, answer: Answer) -> bool:
        """Whether `answer` may join: a slot is free and the batch's KV fits with it. A question alone always starts."""
        rows = [*self.running, answer]
        return len(rows) == 1 or (len(rows) <= self.slots and self.rows.fits(rows))

    def _fail(self, error: BaseException) -> None:
        for answer in self.running:
            self._finish(answer, error)
        self.running = []
        self.rows.reset()

    def _join(self, answer: Answer) -> bool:
        """Compute `answer`'s prompt (past its cached prefix) and first token; it joins the batch unless complete.
        Returns whether the running answers took their next step in the same pass."""
        if answer.stopped():  # its visitor left while it waited
            self._finish(answer)
            return False
        try:
            if answer.streamer is not None:
                answer.streamer.put(torch.empty(1, 0, dtype=torch.long))  # as generate(): the prompt first (none)
            logits, stepped = self.rows.start(answer, self.running)
        except BaseException as error:  # the running answers are as they were (`Rows.start`)
            self.rows.set_aside(answer, keep=False)
            self._finish(answer, error)
            return False
        if stepped is not None:
            try:
                self._advance(stepped)
            except BaseException:
                self.running.append(answer)  # it fails with the running answers (`_loop`)
                raise
        try:
            answer.positions = len(answer.input_ids)
            if answer.choose(logits, self.eos_token_id) or answer.stopped():
                self.rows.set_aside(answer, keep=True)
                self._finish(answer)
                return stepped is not None
        except BaseException as error:
            self.rows.set_aside(answer, keep=False)
            self._finish(answer, error)
            return stepped is not None
        running, self.running = self.running, [*self.running, answer]  # so that an error in `enter` reaches it
        self.rows.enter(answer, running)
        return stepped is not None

    def _step(self) -> None:
        """Feed every running answer its newest token; each chooses its next; complete ones leave."""
        self._advance(self.rows.step(self.running))

    def _advance(self, logits: torch.Tensor) -> None:
        """Every running answer was fed its newest token (`logits`, a row each): each chooses its next; complete ones
        leave."""
        running = self.running
        complete = []
        for row, answer in enumerate(running):
            answer.positions += 1
            if answer.choose(logits[row], self.eos_token_id) or answer.stopped():
                complete.append(answer)
        if complete:
            self.rows.leave(complete, running)
            self.running = [answer for answer in running if answer not in complete]
            for answer in complete:
                self._finish(answer)

    @staticmethod
    def _finish(answer: Answer, error: BaseException | None = None) -> None:
        """Hand `answer` back to its caller."""
        answer.error = error
        if answer.streamer is not None:
            answer.streamer.end()
        answer.done.set()
