"""Scaling with torch.distributed: training tokens/s on N processes against one, and bytes sent per step.

    python benchmarks/scale.py                                  # 2 processes vs 1 (gloo on CPU)
    python benchmarks/scale.py --nproc 8 --device cuda --json runs/bench/scale.json   # a multi-GPU host

Rows (each against the single-process Trainer run in this process, same shapes and batches):
- data parallel: N processes, each with ~1/N of the global batch, one gradient all-reduce per SAE and step;
  tokens/s is global batch tokens per second. The SAE it trains equals the single-process one.
- modules: N processes, each training the SAE of its own hook (N hooks) after a one-time gather of the
  activations; tokens/s counts hook-tokens (a single process trains the N hooks one after another).

Bytes are what each rank contributes to collectives per step ("payload") and an estimate of what it puts
on the wire (ring all-reduce: 2(N−1)/N × payload). On a CPU-only host with few cores the processes share
the cores, so expect little gain: the number that matters comes from re-running this on a multi-GPU host.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def make_acts(args) -> torch.Tensor:
    if args.activations:
        from saekit.cache import ActivationCache
        from saekit.harvest import massive_mask

        acts = ActivationCache(args.activations).read(hooks=[args.hook]).acts[args.hook]
        return acts[~massive_mask(acts.norm(dim=1))]
    g = torch.Generator().manual_seed(0)
    return torch.randn(args.tokens, args.d_in, generator=g) + 0.5


def train_config(args, d_in: int, device: str):
    from saekit.config import SaeConfig, TrainConfig

    return TrainConfig(saes=[SaeConfig(d_in=d_in, d_sae=args.d_sae, k=args.k)], batch_size=args.batch_size,
                       epochs=1000, dead_tokens=args.batch_size, device=device, log_every=10**9)


def timed_steps(trainer, args, barrier=lambda: None, on_start=lambda: None) -> float:
    """Seconds for args.steps training steps after 2 warm-up steps, with a fixed fraction of dead latents
    (AuxK runs, as mid-training)."""
    d_sae = trainer.saes[0].cfg.d_sae
    dead = torch.randperm(d_sae, generator=torch.Generator().manual_seed(1))[: int(args.dead_fraction * d_sae)]

    def step(i: int) -> None:
        since = trainer.since_fired[0]
        since.zero_()
        since[dead.to(since.device)] = 10**9
        trainer.train_step(trainer.data.batch(i))

    for i in range(2):
        step(i)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    barrier()
    on_start()
    t0 = time.perf_counter()
    for i in range(2, 2 + args.steps):
        step(i)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    barrier()
    return time.perf_counter() - t0


def worker(rank: int, world: int, mode: str, args, store: str, q) -> None:
    from saekit.config import DistConfig
    from saekit.dist import DistributedTrainer, setup, shutdown, split
    from saekit.train import Trainer

    device = "cpu" if args.device == "cpu" else f"cuda:{rank}"
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    else:
        os.environ["LOCAL_RANK"] = str(rank)
    comm = setup(DistConfig(dist_timeout=300), args.device, rank, world, f"file://{store}")
    acts = make_acts(args)
    out = tempfile.mkdtemp(prefix=f"saekit-scale-{rank}-")
    b0 = comm.payload_bytes
    if mode == "data":
        lo = sum(split(len(acts), world)[:rank])
        trainer = DistributedTrainer(train_config(args, acts.shape[1], device), acts[lo: lo + split(len(acts), world)[rank]],
                                     out, comm)
        start: list[float] = []
        seconds = timed_steps(trainer, args, comm.barrier,
                              lambda: start.extend([comm.payload_bytes, comm.wire_bytes, comm.calls]))
        result = {"tokens_per_s": args.batch_size * args.steps / seconds,
                  "payload_bytes_per_step": (comm.payload_bytes - start[0]) / args.steps,
                  "wire_bytes_per_step": (comm.wire_bytes - start[1]) / args.steps,
                  "collectives_per_step": (comm.calls - start[2]) / args.steps}
    else:  # modules: every rank sends its shard of each hook to that hook's owner, then trains alone
        sizes = split(len(acts), world)
        lo = sum(sizes[:rank])
        for hook in range(world):  # N hooks; synthetic: the same activations stand in for each
            got = comm.gather_rows(acts[lo: lo + sizes[rank]].to(comm.device), sizes, hook, "gather")
            if got is not None:
                mine = got.cpu()
        exchange = comm.payload_bytes - b0
        trainer = Trainer(train_config(args, acts.shape[1], device), mine, out)
        seconds = timed_steps(trainer, args, comm.barrier)
        result = {"tokens_per_s": world * args.batch_size * args.steps / seconds, "payload_bytes_per_step": 0.0,
                  "wire_bytes_per_step": 0.0, "collectives_per_step": 0.0, "one_time_exchange_bytes": exchange}
    if rank == 0:
        q.put({**result, "threads_per_process": torch.get_num_threads() if device == "cpu" else None})
    shutdown()


def spawn(world: int, mode: str, args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=worker, args=(r, world, mode, args, str(Path(tmp) / "store"), q)) for r in range(world)]
        for p in procs:
            p.start()
        result = q.get(timeout=1800)
        for p in procs:
            p.join()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="processes (one GPU each with --device cuda)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--activations", help="saekit activation cache (default: random activations)")
    p.add_argument("--hook", default="blocks.15.hook_resid_pre")
    p.add_argument("--tokens", type=int, default=65536, help="random activations when no cache is given")
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096, help="global batch (split over the processes)")
    p.add_argument("--dead-fraction", type=float, default=0.3, help="latents held dead so that AuxK runs")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--modes", default="data,modules", help="comma list of: data, modules")
    p.add_argument("--json", help="write the table here")
    args = p.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        sys.exit(f"--device cuda needs {args.nproc} GPUs; this host has {torch.cuda.device_count()}.")

    from saekit.train import Trainer

    acts = make_acts(args)
    base = Trainer(train_config(args, acts.shape[1], args.device), acts, tempfile.mkdtemp(prefix="saekit-scale-"))
    seconds = timed_steps(base, args)
    rows = [{"config": "1 process (Trainer)", "processes": 1, "tokens_per_s": args.batch_size * args.steps / seconds,
             "payload_bytes_per_step": 0.0, "wire_bytes_per_step": 0.0, "collectives_per_step": 0.0,
             "threads_per_process": torch.get_num_threads() if args.device == "cpu" else None}]
    if args.device == "cpu" and torch.get_num_threads() > 1:
        # Per-core reference: the spawned processes each get cores/N threads.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        seconds = timed_steps(base, args)
        torch.set_num_threads(threads)
        rows.append({"config": "1 process (Trainer), 1 thread", "processes": 1, "tokens_per_s":
                     args.batch_size * args.steps / seconds, "payload_bytes_per_step": 0.0, "wire_bytes_per_step": 0.0,
                     "collectives_per_step": 0.0, "threads_per_process": 1})
    for mode in [m for m in args.modes.split(",") if m]:
        r = spawn(args.nproc, mode, args)
        label = f"{args.nproc} processes, data parallel" if mode == "data" else f"{args.nproc} processes, one hook each"
        rows.append({"config": label, "processes": args.nproc, **r})
    # The reference is the faster single-process setting (on a busy host 1 thread can beat all cores).
    ref = max(r["tokens_per_s"] for r in rows if r["processes"] == 1)
    for r in rows:
        r["ratio"] = r["tokens_per_s"] / ref
        r["efficiency"] = r["ratio"] / r["processes"]
    backend = "NCCL" if args.device == "cuda" else "gloo"
    print(f"\nSAE d_in {acts.shape[1]}, d_sae {args.d_sae}, k {args.k}, global batch {args.batch_size}, "
          f"{args.dead_fraction:.0%} latents dead (AuxK on); {args.device} ({backend}), {os.cpu_count()} CPU cores, "
          f"{args.steps} timed steps; ratios against the faster single-process row")
    print(f"{'configuration':34} {'threads':>7} {'tokens/s':>10} {'ratio':>7} {'effic.':>7} {'sent/step':>11} {'wire/step':>11} "
          f"{'colls/step':>10}")
    for r in rows:
        print(f"{r['config']:34} {str(r['threads_per_process'] or '-'):>7} {r['tokens_per_s']:>10,.0f} {r['ratio']:>6.2f}× {r['efficiency']:>6.0%} "
              f"{r['payload_bytes_per_step'] / 2**20:>7.2f} MiB {r['wire_bytes_per_step'] / 2**20:>7.2f} MiB "
              f"{r['collectives_per_step']:>10.1f}")
    for r in rows:
        if "one_time_exchange_bytes" in r:
            print(f"{r['config']}: one-time activation exchange {r['one_time_exchange_bytes'] / 2**20:.1f} MiB sent by rank 0")
    if args.json:
        from saekit.files import write_json

        write_json(args.json, {"args": vars(args), "rows": rows})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
