"""Scale-out with torch.distributed: data-parallel SAE training, and SAEs spread across processes.

    torchrun --nproc-per-node N -m saekit train ...      (or: saekit train --distributed --nproc-per-node N)

This module holds the transport (`Comm`; a one-process Comm does nothing), the data-parallel batches and
trainer, and the launcher; `runner.train` assembles a run the same way on one process or many.

NCCL on GPUs, gloo on CPUs; we build no transport of our own. Two modes:

- **data parallel** (default): the token stream is split into one contiguous shard per rank (each rank
  harvests its own contexts, or reads its slice of an activation cache). Every rank draws the part of the
  global batch that falls in its shard from the *same* seeded permutation that a single process would use,
  so the global batch of step s is exactly the single-process batch of step s, and the global batch size is
  the sum over ranks. Loss normalisers (batch variance, AuxK residual variance, BatchTopK's cutoff) are
  reduced across ranks, so the summed gradient is the single-process gradient; one all-reduce per SAE and
  step carries the gradients, the fired-latent counts and the metrics. A run on N processes therefore
  trains the same SAE as one process (up to float summation order), and resumes on any world size.
- **distributed modules** (`--distribute-modules`, as sparsify's distribute_modules): with several hooks,
  rank r owns hooks r, r+N, …; every rank harvests its shard of the stream for all hooks in one forward
  pass, then each hook's shards are gathered onto its owner, which trains that hook's SAEs alone on all
  tokens.

Rank 0 writes checkpoints and final SAEs (atomically) in data parallel; in module mode each owner writes its
own hooks' directories. Every collective has a timeout (`--dist-timeout`): a rank that dies or hangs makes
the others stop with a SaekitError that says so, instead of waiting forever.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .config import DistConfig
from .errors import SaekitError
from .train import CHECKPOINT, EpochOrder, Trainer, resolve_device

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def under_launcher() -> bool:
    """True inside a torchrun / elastic worker (the launcher sets RANK, WORLD_SIZE, LOCAL_RANK)."""
    return all(k in os.environ for k in ENV_KEYS)


def wants_distributed(cfg: DistConfig) -> bool:
    return cfg.distributed or int(os.environ.get("WORLD_SIZE", "1")) > 1


def split(n: int, world: int) -> list[int]:
    """Sizes of `world` contiguous shards of n items, as even as possible (the first ones one larger)."""
    return [n // world + (r < n % world) for r in range(world)]


# ----------------------------------------------------------------------------- communication

class Comm:
    """The process group plus the few collectives saekit needs, each under a timeout that turns a lost peer
    into a SaekitError. Counts the bytes it sends (payload per call; see `wire_bytes` for a ring estimate)."""

    def __init__(self, rank: int, world: int, local_rank: int, device: torch.device, backend: str, timeout: float):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device, self.backend, self.timeout = device, backend, timeout
        self.payload_bytes = 0  # bytes this rank contributed to collectives
        self.wire_bytes = 0.0  # bytes this rank sends on the wire (ring algorithms: 2(W−1)/W for all-reduce)
        self.calls = 0

    @classmethod
    def single(cls, device: torch.device) -> Comm:
        """One process: every collective returns its input."""
        return cls(0, 1, 0, device, "none", 0.0)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def say(self, *args: Any, **kwargs: Any) -> None:
        """print on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs)

    def global_median(self, t: torch.Tensor, what: str = "gathering values for a median") -> float:
        """The median of every process's values of `t` (1-D)."""
        if self.world == 1:
            return float(t.median()) if len(t) else 0.0
        sizes = self.all_gather_sizes(len(t), what)
        rows = self.gather_rows(t.to(self.device), sizes, 0, what)
        median = rows.median().reshape(1) if self.is_main else torch.zeros(1, device=self.device)
        return float(self.broadcast(median.to(self.device), 0, "sharing the median"))

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except (RuntimeError, dist.DistError) as e:  # gloo/NCCL errors, store timeouts
            if isinstance(e, SaekitError):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SaekitError(
                f"rank {self.rank} of {self.world}: {what} failed ({first[:300]}). Another process has probably "
                f"died or is stuck: its own error is in its output (or the torchrun log). Collectives give up "
                f"after {self.timeout:.0f} s (--dist-timeout).") from e

    def _count(self, t: torch.Tensor, wire_factor: float) -> None:
        n = t.numel() * t.element_size()
        self.payload_bytes += n
        self.wire_bytes += n * wire_factor
        self.calls += 1

    def all_reduce(self, t: torch.Tensor, op: str = "sum", what: str = "all-reduce") -> torch.Tensor:
        """In place (and returned). op: sum, min or max."""
        if self.world == 1:
            return t
        self._count(t, 2 * (self.world - 1) / self.world)
        with self.guard(what):
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return t

    def all_gather(self, t: torch.Tensor, what: str = "all-gather") -> list[torch.Tensor]:
        """Every rank's `t` (all the same shape), in rank order."""
        if self.world == 1:
            return [t]
        self._count(t, self.world - 1)
        out = [torch.empty_like(t) for _ in range(self.world)]
        with self.guard(what):
            dist.all_gather(out, t.contiguous())
        return out

    def all_gather_sizes(self, n: int, what: str = "exchanging sizes") -> list[int]:
        t = torch.tensor([n], dtype=torch.long, device=self.device)
        return [int(x) for x in torch.cat(self.all_gather(t, what)).tolist()]

    def broadcast(self, t: torch.Tensor, src: int, what: str = "broadcast") -> torch.Tensor:
        if self.world == 1:
            return t
        if self.rank == src:
            self._count(t, 1.0)
        with self.guard(what):
            dist.broadcast(t, src)
        return t

    def gather_rows(self, t: torch.Tensor, sizes: list[int], dst: int, what: str = "gather") -> torch.Tensor | None:
        """Concatenate every rank's rows [sizes[r], …] on `dst` (None elsewhere); padded to one size to gather."""
        if self.world == 1:
            return t
        m = max(sizes)
        pad = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=self.device)
        pad[: len(t)] = t
        self._count(pad, 1.0)
        bufs = [torch.empty_like(pad) for _ in range(self.world)] if self.rank == dst else None
        with self.guard(what):
            dist.gather(pad, bufs, dst=dst)
        return torch.cat([b[:s] for b, s in zip(bufs, sizes, strict=True)]) if bufs is not None else None

    def all_gather_object(self, obj: Any, what: str = "exchanging results") -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        with self.guard(what):
            dist.all_gather_object(out, obj)
        return out

    def barrier(self, what: str = "waiting for the other processes") -> None:
        if self.world == 1:
            return
        with self.guard(what):
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def agree(self, flag: bool, what: str = "agreeing") -> bool:
        """True only if every rank says True."""
        t = torch.tensor([1 if flag else 0], dtype=torch.long, device=self.device)
        return bool(self.all_reduce(t, "min", what).item())


def setup(cfg: DistConfig | None = None, device: str = "auto", rank: int | None = None, world: int | None = None,
          init_method: str | None = None) -> Comm:
    """Join the process group: rank/world/addresses from the torchrun environment unless given (tests)."""
    cfg = cfg or DistConfig()
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = resolve_device(device)
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise SaekitError(f"rank {rank} has local rank {local_rank} but this node has {n} GPU(s); launch at most "
                              f"{n} processes per node (--nproc-per-node).")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        # A collective that times out raises in Python (blocking wait) instead of the watchdog killing us.
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    comm = Comm(rank, world, local_rank, dev, backend, cfg.dist_timeout)
    if not dist.is_initialized():
        # torch._dynamo (imported lazily by the optimizers) keeps a reference to a process group that exists
        # when it is first imported, so destroy_process_group can't free it and its gloo threads crash the
        # interpreter's exit now and then (SIGABRT, "terminate called without an active exception"). Import
        # it first.
        importlib.import_module("torch._dynamo")

        with comm.guard("joining the process group"):
            dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    return comm


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- data parallel

class ShardBatches(EpochOrder):
    """This rank's part of the single-process batches. The global stream is the concatenation of every
    rank's shard in rank order; the permutation is the one InMemoryBatches draws for the whole stream, and
    each rank keeps the indices that fall in its shard (about batch/world rows, varying a little per step)."""

    def __init__(self, acts: torch.Tensor, comm: Comm, batch_size: int, seed: int):
        self.comm = comm
        self.sizes = comm.all_gather_sizes(len(acts), "exchanging shard sizes")
        self.lo = sum(self.sizes[: comm.rank])
        self.hi = self.lo + len(acts)
        if sum(self.sizes) < batch_size:
            raise SaekitError(f"only {sum(self.sizes)} activations over {comm.world} processes for a batch of "
                              f"{batch_size}; harvest more tokens or lower --batch-size.")
        super().__init__(acts, sum(self.sizes), batch_size, seed)

    def head(self, n: int) -> torch.Tensor:
        """The first n rows of the global stream on every rank (each owner broadcasts its piece)."""
        pieces, start = [], 0
        for r, size in enumerate(self.sizes):
            take = max(0, min(n - start, size))
            if take:
                buf = (self.acts[:take].contiguous() if r == self.comm.rank else
                       torch.empty((take, *self.acts.shape[1:]), dtype=self.acts.dtype, device=self.acts.device))
                pieces.append(self.comm.broadcast(buf, r, "sharing the first activations"))
            start += size
        return torch.cat(pieces)

    def batch(self, step: int) -> torch.Tensor:
        idx = self.step_indices(step)
        mine = idx[(idx >= self.lo) & (idx < self.hi)] - self.lo
        return self.acts[mine]


@dataclass
class BatchAcross:
    """BatchTopK's view of the global batch (saekit.sae.Across) through a Comm."""

    comm: Comm
    batch_tokens: int

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.comm.all_gather(t, "gathering BatchTopK candidates"))

    def min(self, t: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(t, "min", "reducing the BatchTopK threshold")


class DistributedTrainer(Trainer):
    """Data-parallel Trainer: same SAEs on every rank, each rank a part of the global batch.

    `acts` is this rank's shard of the stream. The result equals a single-process Trainer on the
    concatenated shards with the same config (float summation order aside).
    """

    def __init__(self, cfg, acts: torch.Tensor, out_dir: str | Path, comm: Comm, info: dict[str, Any] | None = None,
                 resume: bool = False):
        self.comm = comm
        self.across = BatchAcross(comm, cfg.batch_size)
        super().__init__(cfg, acts, out_dir, info=info, resume=resume)
        self.writer = comm.is_main
        # Init (and a resumed checkpoint) are the same on every rank; broadcasting rank 0's copy makes it certain.
        for sae in self.saes:
            for t in [*sae.parameters(), *sae.buffers()]:
                comm.broadcast(t.data, 0, "sharing the initial SAE weights")
        self.info["distributed"] = {"mode": "data", "world_size": comm.world, "backend": comm.backend}
        self.comm_bytes_per_step = 0.0

    def _batches(self, acts: torch.Tensor) -> ShardBatches:
        return ShardBatches(acts.to(self.device), self.comm, self.cfg.batch_size, self.cfg.seed)

    # ------------------------------------------------------------------ one step: Trainer.train_step, reduced
    def _batch_tokens(self, local: int) -> int:
        return self.cfg.batch_size  # the global batch: the sum of the ranks' parts

    def _mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(x.sum(0), what="reducing a batch mean") / self.cfg.batch_size

    def _total(self, t: torch.Tensor, what: str) -> torch.Tensor:
        return self.comm.all_reduce(t, what=what)

    def _reduce_grads(self, sae, fired: torch.Tensor, stats: torch.Tensor):
        """One bucket per SAE and step: gradients (summed = the global gradient), fired counts, metrics."""
        params = list(sae.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten().float() for g in grads] + [fired.float(), stats])
        self.comm.all_reduce(flat, what="reducing gradients")
        o = 0
        for p in params:
            g = flat[o: o + p.numel()].view_as(p).to(p.dtype)
            p.grad = g.clone() if p.grad is None else p.grad.copy_(g)
            o += p.numel()
        return flat[o: o + sae.cfg.d_sae] > 0, flat[o + sae.cfg.d_sae:]

    def fit(self, progress: bool = True, stop_after: int | None = None) -> list[Path]:
        b0, s0 = self.comm.payload_bytes, self.step
        paths = super().fit(progress=progress and self.comm.is_main, stop_after=stop_after)
        self.comm_bytes_per_step = (self.comm.payload_bytes - b0) / max(self.step - s0, 1)
        return paths

    # ------------------------------------------------------------------ outputs: rank 0 writes
    def save_checkpoint(self) -> Path:
        path = super().save_checkpoint() if self.comm.is_main else self.out / CHECKPOINT
        self.comm.barrier("waiting for rank 0 to write the checkpoint")
        return path

    def load_checkpoint(self) -> None:
        path = self.out / CHECKPOINT
        if not self.comm.agree(path.is_file(), "checking the checkpoint"):
            raise SaekitError(f"--resume: rank {self.comm.rank} does not see {path}: the run directory must be on a "
                              "filesystem every process shares (and the checkpoint must exist; else drop --resume).")
        super().load_checkpoint()
        steps = self.comm.all_gather_sizes(self.step, "checking the resumed step")
        if len(set(steps)) != 1:
            raise SaekitError(f"--resume: the processes read checkpoints at different steps {steps}; "
                              "is the run directory shared?")

    def save_saes(self) -> list[Path]:
        if self.comm.is_main:
            paths = super().save_saes()
        else:
            paths = [self.out / n for n in self.names]
        self.comm.barrier("waiting for rank 0 to write the SAEs")
        return paths

    def plot(self) -> Path | None:
        return super().plot() if self.comm.is_main else None


# ----------------------------------------------------------------------------- launching

def launch(target: Callable[..., Any], args: tuple, cfg: DistConfig, device: str = "auto") -> int:
    """Run `target(*args, comm)` on --nproc-per-node processes of this node with torch's elastic launcher
    (what torchrun uses), no restarts; inside torchrun, run this rank directly."""
    if under_launcher():
        return run_rank(target, args, cfg, device)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    dev = resolve_device(device)
    n = cfg.nproc_per_node or (torch.cuda.device_count() if dev.type == "cuda" else 2)
    threads = max(1, (os.cpu_count() or 1) // n)
    print(f"saekit: launching {n} processes ({'NCCL' if dev.type == 'cuda' else 'gloo'})", flush=True)
    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                      rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # we report failures ourselves
    try:
        elastic_launch(lc, _worker)(target, args, cfg, device, threads)
    except ChildFailedError as e:
        codes = {r: f.exitcode for r, f in e.failures.items()}
        raise SaekitError(f"distributed training failed (exit codes by rank: {codes}); the first failing rank's "
                          "error is printed above.") from None
    return 0


def _worker(target: Callable[..., Any], args: tuple, cfg: DistConfig, device: str, threads: int) -> None:
    """One launched process: run its rank like a torchrun worker; a SaekitError exits 2 after printing."""
    if resolve_device(device).type == "cpu":
        torch.set_num_threads(threads)
    try:
        run_rank(target, args, cfg, device)
    except SaekitError as e:
        sys.stderr.write(f"saekit: error: {e}\n")  # one write: ranks' lines must not interleave
        sys.stderr.flush()
        os._exit(2)  # skip teardown: the peers may be gone


def run_rank(target: Callable[..., Any], args: tuple, cfg: DistConfig, device: str) -> int:
    comm = setup(cfg, device)
    try:
        target(*args, comm)
    except SaekitError as e:
        if str(e).startswith("rank "):
            raise
        raise type(e)(f"rank {comm.rank} of {comm.world}: {e}") from e
    shutdown()
    return 0
