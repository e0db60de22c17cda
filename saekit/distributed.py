"""Scale-out with torch.distributed: data-parallel SAE training, and SAEs spread across processes.

    torchrun --nproc-per-node N -m saekit train ...      (or: saekit train --distributed --nproc-per-node N)

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

import dataclasses
import datetime
import importlib
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import ops
from .errors import DataError, FileFormatError, NonFiniteError, SaekitError, ShapeError
from .files import read_json, write_json, write_tensors
from .train import CHECKPOINT, EpochOrder, Trainer, resolve_device

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class DistConfig:
    """Scale-out over several processes with torch.distributed (gloo on CPU, NCCL on GPU)."""

    distributed: bool = False
    """Train on several processes: implied under torchrun; outside torchrun saekit launches --nproc-per-node processes itself."""
    nproc_per_node: int = 0
    """Processes to launch for --distributed outside torchrun (0: one per GPU, or 2 on CPU)."""
    distribute_modules: bool = False
    """Each process trains the SAEs of its share of the hooks on every process's tokens (needs hooks ≥ processes), instead of data parallel."""
    dist_timeout: float = 600.0
    """Seconds a collective waits for the other processes before the run stops with an error (a dead or stuck rank)."""


def under_launcher() -> bool:
    """True inside a torchrun / elastic worker (the launcher sets RANK, WORLD_SIZE, LOCAL_RANK)."""
    return all(k in os.environ for k in ENV_KEYS)


def wants_distributed(values: dict[str, Any]) -> bool:
    return bool(values.get("distributed")) or int(os.environ.get("WORLD_SIZE", "1")) > 1


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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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
        self.acts, self.comm, self.batch_size, self.seed = acts, comm, batch_size, seed
        self.sizes = comm.all_gather_sizes(len(acts), "exchanging shard sizes")
        self.lo = sum(self.sizes[: comm.rank])
        self.hi = self.lo + len(acts)
        if self.tokens < batch_size:
            raise SaekitError(f"only {self.tokens} activations over {comm.world} processes for a batch of "
                              f"{batch_size}; harvest more tokens or lower --batch-size.")
        self.steps_per_epoch = self.tokens // batch_size
        self._perm: tuple[int, torch.Tensor] | None = None

    @property
    def tokens(self) -> int:
        return sum(self.sizes)

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


class DistributedTrainer(Trainer):
    """Data-parallel Trainer: same SAEs on every rank, each rank a part of the global batch.

    `acts` is this rank's shard of the stream. The result equals a single-process Trainer on the
    concatenated shards with the same config (float summation order aside).
    """

    def __init__(self, cfg, acts: torch.Tensor, out_dir: str | Path, comm: Comm, info: dict[str, Any] | None = None,
                 resume: bool = False):
        self.comm = comm
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

    def _encode_train(self, sae, x: torch.Tensor, aux_mask, k_aux: int):
        if sae.cfg.architecture == "batchtopk":
            return self._batchtopk_encode(sae, x, aux_mask, k_aux)
        return sae.encode_train(x, aux_mask, k_aux)

    def _batchtopk_encode(self, sae, x: torch.Tensor, aux_mask, k_aux: int):
        """BatchTopK with the cutoff over the global batch: each rank's top k·B candidates are gathered (every
        global winner is among its own rank's local winners), and the threshold tracks the global minimum."""
        values, indices, aux_v, aux_i = ops.encode_topk(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k_candidates,
                                                        aux_mask, k_aux)
        B = self.cfg.batch_size
        keep = sae.cfg.k * B  # k_candidates ≥ k
        flat = values.detach().flatten().float()
        local = flat.topk(min(keep, flat.numel()), sorted=False).values
        cand = torch.full((keep,), -math.inf, device=x.device)
        cand[: len(local)] = local
        cutoff = torch.cat(self.comm.all_gather(cand, "gathering BatchTopK candidates")).topk(keep, sorted=False).values.min()
        values = values * (values >= cutoff)
        if sae.training:
            kept = values.detach()[values.detach() > 0]
            low = (kept.min() if kept.numel() else torch.tensor(math.inf, device=x.device)).float().reshape(1)
            low = self.comm.all_reduce(low, "min", "reducing the BatchTopK threshold")[0]
            if torch.isfinite(low):
                sae.threshold.lerp_(low.to(sae.threshold.dtype), 0.01)
        return values, indices, aux_v, aux_i

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


# ----------------------------------------------------------------------------- activations: shards and caches

def write_cache_shard(acts: dict[str, torch.Tensor], token_ids: torch.Tensor, positions: torch.Tensor,
                      context_ids: torch.Tensor, meta: dict[str, Any], directory: Path, manifest: dict[str, Any],
                      comm: Comm, shard_tokens: int = 65536) -> None:
    """Every rank writes its shard's safetensors files; rank 0 writes one manifest listing them all in rank
    order, so the result is an ordinary saekit activation cache (readable on any number of processes)."""
    from .harvest import MANIFEST

    if comm.is_main and (directory / MANIFEST).exists():
        (directory / MANIFEST).unlink()  # the old manifest must not describe shards being rewritten
    comm.barrier("starting to write the activation cache")
    shards = []
    for i, lo in enumerate(range(0, len(token_ids), shard_tokens)):
        sl = slice(lo, lo + shard_tokens)
        name = f"shard_r{comm.rank:03d}_{i:05d}.safetensors"
        write_tensors(directory / name, {**{f"acts.{h}": a[sl] for h, a in acts.items()}, "token_ids": token_ids[sl],
                                         "positions": positions[sl], "context_ids": context_ids[sl]})
        shards.append({"file": name, "tokens": len(token_ids[sl])})
    everyone = comm.all_gather_object((shards, meta), "collecting the cache shard lists")
    if comm.is_main:
        seconds = max(m["seconds"] for _, m in everyone)
        tokens = sum(m["tokens"] for _, m in everyone)
        write_json(directory / MANIFEST, {
            **manifest, "kind": "saekit-activations", "hooks": list(acts),
            "d_in": {h: int(a.shape[1]) for h, a in acts.items()}, "tokens": tokens,
            "shards": [s for sh, _ in everyone for s in sh],
            "harvest": {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
                        "world_size": comm.world}})
    comm.barrier("waiting for rank 0 to write the cache manifest")


def read_cache_slice(directory: str | Path, hooks: list[str] | None, lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Rows [lo, hi) of an activation cache, reading only the shards (and rows) that hold them."""
    from safetensors import safe_open

    from .harvest import read_manifest

    directory = Path(directory)
    man, hooks = read_manifest(directory, hooks)
    parts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    start = 0
    for s in man["shards"]:
        a, b = max(lo, start), min(hi, start + s["tokens"])
        if a < b:
            path = directory / s["file"]
            try:
                with safe_open(str(path), framework="pt") as f:
                    for h in hooks:
                        parts[h].append(f.get_slice(f"acts.{h}")[a - start: b - start].float())
            except Exception as e:
                raise FileFormatError(f"{path} is missing or unreadable ({e}); re-harvest the cache.") from e
        start += s["tokens"]
    if start != man["tokens"]:
        raise FileFormatError(f"{directory}: the shards hold {start} tokens, the manifest says {man['tokens']}.")
    out = {}
    for h in hooks:
        t = torch.cat(parts[h]) if parts[h] else torch.zeros(0, man["d_in"][h])
        if t.shape[1] != man["d_in"][h]:
            raise ShapeError(f"cache {directory}: {h} has width {t.shape[1]}, manifest says {man['d_in'][h]}.")
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"cache {directory}: activations at {h} hold NaN/inf; re-harvest.")
        out[h] = t
    return out


def harvest_shard(values: dict[str, Any], hcfg, model, comm: Comm) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Harvest this rank's share of the tokens from its own contexts (rank r takes contexts r, r+W, …)."""
    from .cli import _contexts
    from .harvest import Harvester

    train_ctx, _ = _contexts(model, hcfg)
    mine = train_ctx.tokens[comm.rank:: comm.world]
    want = split(hcfg.tokens, comm.world)[comm.rank]
    try:
        h = Harvester(model, hcfg.hooks).harvest(mine, want, hcfg.batch_contexts, progress=comm.is_main)
    except DataError as e:
        raise DataError(f"rank {comm.rank} of {comm.world} (contexts {comm.rank}, {comm.rank + comm.world}, …): {e}") from e
    h.context_ids = h.context_ids * comm.world + comm.rank  # back to indices into all training contexts
    return h.acts, {"harvest": h}


# ----------------------------------------------------------------------------- the command

def cmd_train(values: dict[str, Any]) -> int:
    """`saekit train` on several processes: launch them (outside torchrun) or run this rank."""
    dcfg = _dist_config(values)
    if not under_launcher():
        return launch(values, dcfg)
    return run_rank(values, dcfg)


def _dist_config(values: dict[str, Any]) -> DistConfig:
    from .cli import build_config

    return build_config(DistConfig, values)


def launch(values: dict[str, Any], dcfg: DistConfig) -> int:
    """Start nproc workers on this node with torch's elastic launcher (what torchrun uses), no restarts."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    device = resolve_device(values.get("device", "auto"))
    n = dcfg.nproc_per_node or (torch.cuda.device_count() if device.type == "cuda" else 2)
    threads = max(1, (os.cpu_count() or 1) // n)
    print(f"saekit: launching {n} processes ({'NCCL' if device.type == 'cuda' else 'gloo'})", flush=True)
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                       rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    import logging

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # we report failures ourselves
    try:
        elastic_launch(cfg, _worker)(values, threads)
    except ChildFailedError as e:
        codes = {r: f.exitcode for r, f in e.failures.items()}
        raise SaekitError(f"distributed training failed (exit codes by rank: {codes}); the first failing rank's "
                          "error is printed above.") from None
    return 0


def _worker(values: dict[str, Any], threads: int) -> None:
    """One launched process: run its rank like a torchrun worker; a SaekitError exits 2 after printing."""
    if resolve_device(values.get("device", "auto")).type == "cpu":
        torch.set_num_threads(threads)
    try:
        run_rank(values, _dist_config(values))
    except SaekitError as e:
        sys.stderr.write(f"saekit: error: {e}\n")  # one write: ranks' lines must not interleave
        sys.stderr.flush()
        os._exit(2)  # skip teardown: the peers may be gone


def run_rank(values: dict[str, Any], dcfg: DistConfig) -> int:
    comm = setup(dcfg, values.get("device", "auto"))
    try:
        run_training(values, dcfg, comm)
    except SaekitError as e:
        if str(e).startswith("rank "):
            raise
        raise type(e)(f"rank {comm.rank} of {comm.world}: {e}") from e
    shutdown()
    return 0


def run_training(values: dict[str, Any], dcfg: DistConfig, comm: Comm) -> list[Path]:
    """The distributed `saekit train`: harvest (or read) this rank's shard, train, evaluate. Returns SAE dirs."""
    from .cli import _data_manifest, _load_model, build_config, run_eval, sae_configs
    from .config import HarvestConfig, TrainConfig
    from .harvest import MANIFEST, massive_mask

    say = print if comm.is_main else (lambda *a, **k: None)
    out = Path(values.get("out") or "runs/train")
    hcfg = build_config(HarvestConfig, values)
    tcfg_base = build_config(TrainConfig, values)
    model = None
    if values.get("stream"):
        raise SaekitError("--stream is not supported with --distributed yet: harvest into a cache (the default) or "
                          "train on one process.")
    if values.get("activations"):
        cache_dir = Path(values["activations"])
        man = read_json(cache_dir / MANIFEST)
        data_info = {k: man[k] for k in ("model", "model_arg", "dataset", "text_column", "context_size",
                                         "heldout_fraction", "seed") if k in man}
        hooks = list(values.get("hooks") or man.get("hooks", []))
        total = int(man.get("tokens", 0))
        lo = sum(split(total, comm.world)[: comm.rank])
        local = read_cache_slice(cache_dir, hooks, lo, lo + split(total, comm.world)[comm.rank])
    else:
        cache_dir = out / "activations"
        model = _load_model(values)
        data_info = _data_manifest(hcfg, model)
        hooks = hcfg.hooks
        man_path = cache_dir / MANIFEST
        same = man_path.is_file() and read_json(man_path).get("harvest_config") == dataclasses.asdict(hcfg)
        if comm.agree(same, "checking the activation cache"):
            say(f"saekit: reusing the activations cached in {cache_dir}")
            total = int(read_json(man_path)["tokens"])
            lo = sum(split(total, comm.world)[: comm.rank])
            local = read_cache_slice(cache_dir, hooks, lo, lo + split(total, comm.world)[comm.rank])
        else:
            start = time.perf_counter()
            local, extra = harvest_shard(values, hcfg, model, comm)
            h = extra["harvest"]
            write_cache_shard(h.acts, h.token_ids, h.positions, h.context_ids, h.meta, cache_dir,
                              {**data_info, "harvest_config": dataclasses.asdict(hcfg)}, comm)
            n = sum(comm.all_gather_sizes(len(h), "counting harvested tokens"))
            say(f"harvest: {n:,} tokens on {comm.world} processes in {time.perf_counter() - start:.0f} s (data loading included)")
    modules = dcfg.distribute_modules
    if modules and len(hooks) < comm.world:
        raise SaekitError(f"--distribute-modules gives each process its own hooks, but there are {len(hooks)} hook(s) "
                          f"for {comm.world} processes; add hooks, use fewer processes, or drop the flag (data parallel).")
    sizes = comm.all_gather_sizes(len(next(iter(local.values()))), "exchanging shard sizes")
    resume = bool(values.get("resume"))
    mode = {"mode": "modules" if modules else "data", "world_size": comm.world, "backend": comm.backend}
    owned: dict[str, torch.Tensor] = {}
    if modules:
        # Every exchange first (so no rank trains while another waits in a collective): the owner of hook j
        # (rank j mod W) receives every rank's rows of it, in stream order, and then trains it alone.
        for j, hook in enumerate(hooks):
            owner = j % comm.world
            acts = comm.gather_rows(local.pop(hook).to(comm.device), sizes, owner,
                                    f"sending {hook} activations to rank {owner}")
            if acts is not None:
                owned[hook] = acts.cpu()
    paths: list[Path] = []
    for hook in hooks:
        hook_out = out if len(hooks) == 1 else out / hook
        info = {**data_info, "hook": hook, "activations": str(cache_dir), "harvest_tokens": sum(sizes)}
        if modules:
            if hook not in owned:
                continue
            acts = owned.pop(hook)
            massive = massive_mask(acts.norm(dim=-1), hcfg.massive_multiple)
            n_massive = int(massive.sum())
        else:
            acts = local[hook]
            norms = comm.gather_rows(acts.norm(dim=-1).to(comm.device), sizes, 0, "gathering activation norms")
            median = norms.median().reshape(1) if comm.is_main else torch.zeros(1, device=comm.device)
            median = comm.broadcast(median.to(comm.device), 0, "sharing the median norm").cpu()
            massive = acts.norm(dim=-1) > hcfg.massive_multiple * median  # massive_mask with the global median
            n_massive = sum(comm.all_gather_sizes(int(massive.sum()), "counting massive tokens"))
        if tcfg_base.exclude_massive:
            acts = acts[~massive]
        tcfg = dataclasses.replace(tcfg_base, saes=sae_configs(values, acts.shape[1]))
        info["massive_tokens_excluded"] = n_massive if tcfg.exclude_massive else 0
        msg = (f"{hook}: {n_massive} massive tokens of {sum(sizes)} "
               f"({'left out of' if tcfg.exclude_massive else 'kept in'} training)")
        start = time.perf_counter()
        if modules:
            print(f"[rank {comm.rank}] {msg}; training it here", flush=True)
            trainer = Trainer(tcfg, acts, hook_out, info={**info, "distributed": mode}, resume=resume)
            saved = trainer.fit(progress=comm.is_main)
            print(f"[rank {comm.rank}] trained {len(saved)} SAE(s) on {hook} in {time.perf_counter() - start:.0f} s",
                  flush=True)
        else:
            say(msg)
            trainer = DistributedTrainer(tcfg, acts, hook_out, comm, info=info, resume=resume)
            saved = trainer.fit(progress=comm.is_main)
            say(f"trained {len(saved)} SAE(s) on {hook} in {time.perf_counter() - start:.0f} s on {comm.world} "
                f"processes; {trainer.comm_bytes_per_step / 2**20:.2f} MiB all-reduced per step and rank")
        paths += saved
    # Module mode: each rank knows only its own SAEs; data parallel: all ranks hold the same list.
    everyone = comm.all_gather_object([str(p) for p in paths], "collecting SAE paths")
    paths = list(dict.fromkeys(Path(p) for ps in everyone for p in ps))
    if not values.get("no_eval"):
        # Evaluation needs no collectives: rank r evaluates SAEs r, r+W, … and nobody waits on anybody.
        for path in paths[comm.rank:: comm.world]:
            model = model or _load_model({**values, "model": data_info.get("model_arg", "default")})
            run_eval(path, values, model)
    return paths
