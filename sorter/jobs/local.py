"""The in-process executor: a decode process pool feeding batched inference here.

Used when no broker is configured (the embedded default). Ids arrive after
their registration has committed; every ``batch_size`` of them become one
batch with its own session: claimed, decoded file by file in the pool,
classified in one forward pass in this process, written and committed in one
transaction. At most ``max_batches`` are in flight, so memory stays flat
however large the archive, and while one batch is inferred the next ones decode.

A decoder that kills its process (a segfault in a codec, the OOM killer)
breaks the whole pool. The pool is then restarted and the unfinished items
are decoded again one at a time, so that only the file that kills the
decoder a second time is failed (``decode_error``, "decoder crashed: ...").
A chunk whose result cannot come back for another reason is decoded again
one file at a time too: no error of a decode process ever stops a scan.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from types import TracebackType

from sqlalchemy.orm import Session, sessionmaker

from sorter.decode import Decoder, Prepared, decode_chunk, decode_one, init_decode_process, run_decoder
from sorter.domain import Claimed, FailureReason, Outcome, Status
from sorter.errors import describe
from sorter.model.classifier import Classifier
from sorter.model.spec import PreprocessParams
from sorter.pipeline import claim_batch, infer, write_outcomes

log = logging.getLogger(__name__)


def _pool_context() -> multiprocessing.context.BaseContext:
    # forkserver: children never inherit the parent's threads, database
    # connections or CUDA state. The server preloads only the decode side: by
    # default it would import ``__main__`` (the CLI, hence torch) into every worker.
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["sorter.decode"])
        return context
    return multiprocessing.get_context("spawn")


#: Most instances per pool task: one round trip per chunk instead of one per file
#: (+18 % decode throughput with two processes on 512 x 512 CT, 520 -> 615 files/s).
CHUNK = 16


@dataclass
class _Chunk:
    items: list[Claimed]
    future: Future[list[Prepared | Outcome]]


@dataclass
class _Batch:
    session: Session
    items: list[Claimed]
    chunks: list[_Chunk] = field(default_factory=list)


def _done(future: Future[list[Prepared | Outcome]]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


class LocalExecutor:
    """Classify submitted instance ids in batches, decoding in a process pool.

    Parameters
    ----------
    sessions
        Session factory; each batch gets its own session and transaction.
    classifier
        The resident model (loaded once, in this process).
    model_id
        The classifier's ``models`` row.
    workers
        Decode processes.
    batch_size
        Instances per forward pass and per transaction.
    frames
        Frames classified per multi-frame instance.
    statuses
        Statuses an instance must still have to be classified (``pending`` for
        a scan; ``done`` too for a reclassification).
    on_batch
        Called with each committed batch's outcomes (progress, summaries).
    observer
        Called with each committed batch's outcomes and the seconds its
        inference and write took (metrics); ``None``: not timed.
    decode
        The decode function run in the pool (a module-level function).
    max_batches
        Batches in flight at once. Enough decode work must be queued to keep the
        pool busy while this process reads the next registration batch's headers
        (3 left the pool idle about 10 % of a 512 x 512 CT scan; 8 did not). Each
        holds a database connection: keep it below the engine's pool (5 + 10 overflow).
    model_in_workers
        When the model runs on ONNX Runtime on the CPU, run it in the decode
        processes on what they decoded: they send back logits instead of
        images (no 128 KiB per file through a pipe) and this process no longer
        competes with them for the cores. On CUDA, or with torch, the model
        stays here.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        classifier: Classifier,
        model_id: int,
        *,
        workers: int,
        batch_size: int,
        frames: int = 1,
        statuses: Collection[Status] = (Status.PENDING,),
        on_batch: Callable[[list[Outcome]], None] | None = None,
        observer: Callable[[list[Outcome], float], None] | None = None,
        decode: Decoder = decode_one,
        max_batches: int = 8,
        model_in_workers: bool = True,
    ) -> None:
        self.sessions = sessions
        self.classifier = classifier
        self.model_id = model_id
        self.workers = max(1, workers)
        self.batch_size = max(1, batch_size)
        self.frames = frames
        self.statuses = tuple(statuses)
        self.on_batch = on_batch
        self.observer = observer
        self.decode = decode
        self.max_batches = max(1, max_batches)
        self._graph: bytes | None = getattr(classifier.runner, "graph", None) if model_in_workers else None
        #: Seconds this process spent per stage: ``decode_wait`` (blocked on the pool),
        #: ``model`` (forward passes, calibration and verdicts), ``write`` (insert and
        #: commit). With the model in the decode processes ``model`` holds the verdicts only.
        self.stage_seconds: defaultdict[str, float] = defaultdict(float)
        #: Images this process ran through the model (0 when the decode processes did).
        self.images_here = 0
        self._waiting: list[int] = []
        self._in_flight: deque[_Batch] = deque()
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> LocalExecutor:
        self._pool = self._new_pool()
        # Start the decode processes now (a pool starts them on demand), so that
        # they are ready by the time the first registered batch arrives.
        for _ in range(self.workers):
            self._pool.submit(int)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # On an exception the open batches roll back: their instances stay
        # pending and the next run picks them up.
        while self._in_flight:
            batch = self._in_flight.popleft()
            for chunk in batch.chunks:
                chunk.future.cancel()
            batch.session.close()
        if self._pool is not None:
            self._pool.shutdown(wait=kind is None, cancel_futures=True)
            self._pool = None

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.workers,
            mp_context=_pool_context(),
            initializer=init_decode_process,
            initargs=(os.getpid(), self._graph),
        )

    def submit(self, ids: Iterable[int]) -> None:
        """Queue committed instance ids; full batches start at once."""
        self._waiting.extend(ids)
        while len(self._waiting) >= self.batch_size:
            self._start(self._waiting[: self.batch_size])
            del self._waiting[: self.batch_size]

    def already_submitted(self, ids: Sequence[int]) -> int:
        """None: what this executor is given is finished before a resume reads the pending ones."""
        return 0

    def drain(self) -> None:
        """Start the partial batch and finish everything in flight (and what that submits again:
        instances read from another copy once their first file failed)."""
        while self._waiting or self._in_flight:
            if self._waiting:
                # Taken first: finishing a batch inside _start may submit again.
                ids, self._waiting = self._waiting, []
                self._start(ids)
            while self._in_flight:
                self._finish_oldest()

    def _start(self, ids: Sequence[int]) -> None:
        assert self._pool is not None, "use LocalExecutor as a context manager"
        session = self.sessions()
        try:
            items = claim_batch(session, ids, self.statuses)
        except BaseException:
            session.close()
            raise
        if not items:
            session.close()
            return
        batch = _Batch(session, items)
        self._in_flight.append(batch)
        params = self.classifier.spec.preprocess
        # Chunks small enough that every decode process gets a share of the batch.
        size = max(1, min(CHUNK, -(-len(items) // self.workers)))
        parts = [items[i : i + size] for i in range(0, len(items), size)]
        try:
            for part in parts:
                codes = self.classifier.spec.header_codes([item.header_label for item in part])
                future = self._pool.submit(decode_chunk, self.decode, part, params, self.frames, codes)
                batch.chunks.append(_Chunk(part, future))
        except BrokenProcessPool:
            # A worker died since the last batch was finished: what of this batch was
            # not submitted is marked unfinished, and the recovery decodes it.
            submitted = len(batch.chunks)
            batch.chunks += [_Chunk(part, Future()) for part in parts[submitted:]]
            self._recover_from_crash()
        while len(self._in_flight) > self.max_batches:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        batch = self._in_flight[0]
        try:
            started = time.perf_counter()
            decoded = self._results(batch)
            decoded_at = time.perf_counter()
            outcomes = infer(self.classifier, batch.items, decoded)
            inferred_at = time.perf_counter()
            written = write_outcomes(batch.session, self.model_id, outcomes)
            batch.session.commit()
            outcomes = written.outcomes
            self._waiting.extend(written.again)  # started by the next submit or drain
            done_at = time.perf_counter()
        finally:
            self._in_flight.popleft()
            batch.session.close()
        self.stage_seconds["decode_wait"] += decoded_at - started
        self.stage_seconds["model"] += inferred_at - decoded_at
        self.stage_seconds["write"] += done_at - inferred_at
        self.images_here += sum(
            len(d.images) for d in decoded if isinstance(d, Prepared) and d.logits is None
        )
        if self.on_batch is not None:
            self.on_batch(outcomes)
        if self.observer is not None:
            self.observer(outcomes, done_at - decoded_at)

    def _results(self, batch: _Batch) -> list[Prepared | Outcome]:
        results: list[Prepared | Outcome] = []
        for chunk in batch.chunks:
            try:
                results += chunk.future.result()
            except BrokenProcessPool:
                self._recover_from_crash()  # every unfinished future is replaced by a finished one
                results += chunk.future.result()
            except Exception as exc:  # the chunk's result could not come back (say, unpicklable)
                log.warning("a decode task failed (%s); decoding its files one at a time", describe(exc))
                params = self.classifier.spec.preprocess
                results += [self._isolated(item, params) for item in chunk.items]
        return results

    def _recover_from_crash(self) -> None:
        """Restart the pool; re-decode every item of an unfinished chunk alone to find the culprit."""
        log.warning("a decode process died; restarting the pool and isolating the file")
        self._restart_pool()
        params = self.classifier.spec.preprocess
        for batch in self._in_flight:
            for chunk in batch.chunks:
                if _done(chunk.future):
                    continue
                chunk.future = Future()
                chunk.future.set_result([self._isolated(item, params) for item in chunk.items])

    def _restart_pool(self) -> None:
        """A fresh pool, checked with a no-op so that a pool that cannot start at all
        (a broken environment) stops the run instead of failing every file."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new_pool()
        try:
            self._pool.submit(int).result()
        except BrokenProcessPool as exc:
            raise RuntimeError("decode processes die on start; see the errors above") from exc

    def _isolated(self, item: Claimed, params: PreprocessParams) -> Prepared | Outcome:
        assert self._pool is not None
        try:
            return self._pool.submit(run_decoder, self.decode, item, params, self.frames).result()
        except BrokenProcessPool:
            log.warning("instance %d kills the decoder; failing it", item.id)
            self._restart_pool()
            detail = "decoder crashed: the decode process died on this file twice"
        except Exception as exc:  # the result could not come back; the file is the one to blame
            log.warning("instance %d: decoding failed in the pool (%s); failing it", item.id, describe(exc))
            detail = describe(exc)
        return Outcome(
            item.id, Status.FAILED, item.header_label, error=FailureReason.DECODE_ERROR, detail=detail
        )
