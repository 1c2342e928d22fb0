"""Tensor-parallel serving: one engine whose model is split over N processes.

Rank 0 is the process that builds the engine: it loads its own shard, schedules, samples and
streams as usual. `TensorParallelWorkers.spawn` starts ranks 1..N-1 (torch.multiprocessing,
spawn); under torchrun (one machine or several) they are the job's other ranks, which call
`run_tensor_parallel_worker()`. Rank 0 tells them which model to load; each loads only its
slices of the checkpoint and keeps its shard of the paged KV cache (its own key/value heads)
under the same block layout. Every step, rank 0 broadcasts the step's plan and all ranks run the
same forward pass, meeting in its all-reduces; the vocabulary-parallel head gives every rank the
full logits, and rank 0 alone samples from them. A worker that dies closes its connections, so
rank 0's next collective fails: it stops the other workers and raises `DistributedError` instead
of waiting forever (under torchrun, its agent also stops the job).
"""

from __future__ import annotations

import atexit
import dataclasses
import threading
from collections.abc import Callable
from multiprocessing import connection
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmforge.distributed.process_group import (
    DistributedContext,
    broadcast_object,
    destroy_distributed,
    free_port,
    init_distributed,
    init_spawned,
    launched_local_world_size,
    launched_world_size,
    serving_group,
)
from lmforge.distributed.sharded_loading import load_tensor_parallel
from lmforge.distributed.tensor_parallel import check_devices
from lmforge.engine.config import EngineConfig
from lmforge.engine.llm_engine import LLMEngine
from lmforge.engine.model_runner import ModelRunner, StepInputs
from lmforge.errors import (
    DistributedError,
    InputError,
    UnsupportedError,
    require_counts,
)
from lmforge.hardware import resolve_dtype

SHUTDOWN_SECONDS = 30  # how long a worker may take to leave after being told to stop


class TensorParallelWorkers:
    """Ranks 1..N-1 of a tensor-parallel engine, as rank 0 sees them: processes it started itself
    (`spawn`), or the other processes of a torchrun job (`launched`)."""

    def __init__(self, world_size: int, processes: list[mp.Process], owns_group: bool):
        self.world_size, self.processes, self.owns_group = world_size, processes, owns_group
        self.context: DistributedContext | None = None  # set once the group has formed
        self.group: dist.ProcessGroup | None = None  # None: the default group
        self.closed = False  # the group is gone: no step can run any more
        self.stopping = False  # shutdown() was asked for: workers exiting now is no failure
        atexit.register(self.shutdown)

    @classmethod
    def spawn(cls, ref: str | Path, world_size: int, dtype: torch.dtype,
              device_type: str = "cpu") -> TensorParallelWorkers:
        """Start ranks 1..N-1 here (torch.multiprocessing, spawn) and form the group with them."""
        if dist.is_initialized():
            raise DistributedError("this process already belongs to a torch.distributed group that is not a "
                                   "torchrun job of tensor_parallel_size processes; start the tensor-parallel "
                                   "engine in a process of its own.")
        threads = max(1, torch.get_num_threads() // world_size) if device_type == "cpu" else torch.get_num_threads()
        port, spawn = free_port(), mp.get_context("spawn")
        processes = [spawn.Process(target=_spawned_worker, name=f"lmforge-tensor-parallel-{rank}", daemon=True,
                                   args=(rank, world_size, port, device_type, threads))
                     for rank in range(1, world_size)]
        for process in processes:
            process.start()
        workers = cls(world_size, processes, owns_group=True)
        torch.set_num_threads(threads)  # the N processes share this machine's cores
        workers.context = workers._join(port, device_type)
        workers._collective(broadcast_object, (str(ref), dtype), workers.context)
        return workers

    @classmethod
    def launched(cls, ref: str | Path, dtype: torch.dtype, context: DistributedContext,
                 group: dist.ProcessGroup) -> TensorParallelWorkers:
        """The other processes of this torchrun job, waiting in `run_tensor_parallel_worker`: tell them
        which model to load. torchrun's agent watches them; the group stays the job's."""
        workers = cls(context.world_size, [], owns_group=False)
        workers.context, workers.group = context, group
        workers._collective(broadcast_object, (str(ref), dtype), context, 0, group)
        return workers

    def _join(self, port: int, device_type: str) -> DistributedContext:
        """Join the spawned group from a helper thread, so a worker that dies before joining fails us fast."""
        joined: dict = {}

        def join() -> None:
            try:
                joined["context"] = init_spawned(0, self.world_size, port, device_type)
            except Exception as exc:
                joined["error"] = exc

        thread = threading.Thread(target=join, name="lmforge-tensor-parallel-join", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            self._check_workers()
        if "error" in joined:
            self._stop_workers()
            raise DistributedError(f"the tensor-parallel group could not form: {joined['error']}") from joined["error"]
        return joined["context"]

    def start_runners(self, num_blocks: int, block_size: int) -> None:
        """Give every worker the KV pool's size (rank 0 sized it), so all hold the same block layout."""
        self._collective(broadcast_object, (num_blocks, block_size), self.context, 0, self.group)

    def run(self, step: StepInputs, run_here) -> torch.Tensor:
        """Send `step` to the workers and run it here with them; returns this process's result."""
        if self.closed:
            raise DistributedError("this tensor-parallel engine was shut down; create a new one.")
        self._check_workers()

        def send_and_run() -> torch.Tensor:
            broadcast_object(step, self.context, 0, self.group)
            return run_here(step)

        return self._collective(send_and_run)

    def _collective(self, function, *args):
        try:
            return function(*args)
        except RuntimeError as exc:  # gloo: "Connection closed by peer" when a worker has died
            self._wait_for_exits(timeout=5)
            dead = self._dead_workers()
            self._stop_workers()
            what = f"worker {dead} exited" if dead else "a worker stopped answering"
            raise DistributedError(f"tensor-parallel {what} during a step ({exc}); the engine cannot continue: "
                                   "create it again.") from exc

    def _wait_for_exits(self, timeout: float | None) -> None:
        """Wait until a worker exits (at most `timeout` seconds), and collect the exit status of those that did."""
        if not self.processes:
            return
        exited = connection.wait([process.sentinel for process in self.processes], timeout)
        for process in self.processes:
            if process.sentinel in exited:
                process.join()  # its pipes close a moment before its exit status exists

    def _dead_workers(self) -> str:
        return ", ".join(f"rank {rank} (exit code {process.exitcode})"
                         for rank, process in enumerate(self.processes, start=1) if process.exitcode is not None)

    def _check_workers(self) -> None:
        dead = self._dead_workers()
        if dead:
            self._stop_workers()
            raise DistributedError(f"tensor-parallel worker {dead} has exited; the engine cannot continue without "
                                   "it: create it again (and check the worker's error output above).")

    def _stop_workers(self) -> None:
        self.closed = True
        for process in self.processes:
            if process.is_alive():
                process.kill()
            process.join()
        if self.owns_group:
            destroy_distributed()

    def watch(self, on_death: Callable[[DistributedError], None]) -> None:
        """Call `on_death` (from a helper thread) as soon as any worker exits without being asked to,
        even while the engine is idle: a server uses it to stop instead of failing request after request.
        torchrun's agent watches the processes it started (it stops the job when one fails)."""
        if not self.processes:
            return

        def wait() -> None:
            self._wait_for_exits(timeout=None)
            if not self.stopping:
                on_death(DistributedError(f"tensor-parallel worker {self._dead_workers()} has exited; the model "
                                          "cannot run without it: restart (and check the worker's error output)."))

        threading.Thread(target=wait, name="lmforge-tensor-parallel-watch", daemon=True).start()

    def shutdown(self) -> None:
        """Tell the workers to stop, wait for them to leave, and leave the group (idempotent)."""
        self.stopping = True
        if self.closed:
            return
        if self._dead_workers():
            self._stop_workers()
            return
        self.closed = True
        try:
            broadcast_object(None, self.context, 0, self.group)
        except RuntimeError:
            pass  # a worker went away meanwhile: it is stopped below either way
        for process in self.processes:
            process.join(SHUTDOWN_SECONDS)
            if process.is_alive():
                process.kill()
                process.join()
        if self.owns_group:
            destroy_distributed()


def _serve_steps(context: DistributedContext, group: dist.ProcessGroup | None) -> None:
    """A worker's life: load this rank's shard of the model rank 0 names, then run every step rank 0
    broadcasts until it sends None (shutdown, or rank 0 failed before the engine started)."""
    task = broadcast_object(None, context, 0, group)
    if task is None:
        return
    ref, dtype = task
    model = load_tensor_parallel(ref, context.rank, context.world_size, group, dtype=dtype, device=context.device)
    num_blocks, block_size = broadcast_object(None, context, 0, group)
    runner = ModelRunner(model, num_blocks, block_size)
    while (step := broadcast_object(None, context, 0, group)) is not None:
        runner.run(step)


def _spawned_worker(rank: int, world_size: int, port: int, device_type: str, threads: int) -> None:
    """A worker process rank 0 started: join its group, serve, leave."""
    torch.set_num_threads(threads)
    context = init_spawned(rank, world_size, port, device_type)
    try:
        _serve_steps(context, None)
    except RuntimeError as exc:  # rank 0 went away: nothing left to serve
        raise SystemExit(f"tensor-parallel worker {rank}: lost rank 0 ({exc}); exiting.") from None
    destroy_distributed()


def run_tensor_parallel_worker() -> None:
    """Ranks 1..N-1 of a torchrun job whose rank 0 runs the tensor-parallel engine (`LLM(...,
    tensor_parallel_size=N)` or `lmforge serve --tensor-parallel-size N`): load this rank's shard of the
    model rank 0 names, run every step with it, and return when rank 0 shuts the engine down."""
    context = init_distributed()
    if context.rank == 0:
        raise InputError("run_tensor_parallel_worker() is for ranks 1..N-1 of a torchrun job; rank 0 runs the "
                         "engine itself: LLM(model, tensor_parallel_size=N).")
    _serve_steps(context, serving_group(context))


def start_tensor_parallel_engine(ref: str | Path, size: int, tokenizer=None, config: EngineConfig | None = None,
                                 dtype: str | torch.dtype = "auto", quantization: str | None = None) -> LLMEngine:
    """An engine over the model `ref` split in `size` processes: this one (rank 0) and `size` - 1 others —
    started here, or, under torchrun, the job's other ranks (which call `run_tensor_parallel_worker`).

    Rank 0 loads its shard, and so checks the split, before any spawned worker starts. Uses one GPU
    per process (NCCL) when CUDA is available, else CPU processes (gloo) sharing the cores.
    """
    from lmforge.registry import AutoTokenizer

    require_counts("LLM", {"tensor_parallel_size": size})
    if not isinstance(ref, (str, Path)):
        raise InputError("tensor_parallel_size > 1 needs the model by name, folder or GGUF file (each process "
                         "loads its own slices of it), not a loaded model.")
    if quantization is not None:
        raise UnsupportedError("tensor parallelism splits float weights; drop quantization or tensor_parallel_size.")
    launched = launched_world_size()
    if launched > 1 and launched != size:
        raise InputError(f"torchrun started {launched} processes but tensor_parallel_size is {size}; launch "
                         f"with as many processes as the split (--nnodes x --nproc_per_node = {size}).")
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(ref)
    config = config or EngineConfig()
    if launched > 1:
        return _start_launched(ref, tokenizer, config, dtype)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    check_devices(size, device_type)
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    dtype = resolve_dtype(dtype, device)
    model = load_tensor_parallel(ref, 0, size, dtype=dtype, device=device)
    if device_type == "cpu":  # the processes share this machine's memory: together they take the fraction
        config = dataclasses.replace(config, kv_cache_memory_fraction=config.kv_cache_memory_fraction / size)
    return _engine(model, tokenizer, config, TensorParallelWorkers.spawn(ref, size, dtype, device_type))


def _start_launched(ref: str | Path, tokenizer, config: EngineConfig, dtype: str | torch.dtype) -> LLMEngine:
    """Rank 0 of a torchrun job: the engine, with the job's other ranks as its workers."""
    context = init_distributed()
    if context.rank != 0:
        raise InputError(f"rank {context.rank} of this torchrun job tried to start the engine; rank 0 runs it, "
                         "and the other ranks call lmforge.engine.run_tensor_parallel_worker() instead.")
    group = serving_group(context)
    try:
        dtype = resolve_dtype(dtype, context.device)
        model = load_tensor_parallel(ref, 0, context.world_size, group, dtype=dtype, device=context.device)
    except BaseException:
        broadcast_object(None, context, 0, group)  # the workers stop waiting for a model
        raise
    if context.device.type == "cpu":  # this machine's processes share its memory
        share = config.kv_cache_memory_fraction / launched_local_world_size()
        config = dataclasses.replace(config, kv_cache_memory_fraction=share)
    return _engine(model, tokenizer, config, TensorParallelWorkers.launched(ref, dtype, context, group))


def _engine(model, tokenizer, config: EngineConfig, workers: TensorParallelWorkers) -> LLMEngine:
    """The engine over rank 0's shard; the workers stop if it cannot start."""
    try:
        return LLMEngine(model, tokenizer, config, workers)
    except BaseException:
        workers.shutdown()
        raise
