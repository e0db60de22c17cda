"""Where saekit's training step spends its time (torch.profiler), at the benchmark shape, with a chosen
fraction of dead latents so that AuxK runs as it does mid-training.

    python benchmarks/profile_step.py --activations /tmp/acts --dead-fraction 0.3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--activations", default=None, help="saekit activation cache (default: random activations)")
    p.add_argument("--hook", default="blocks.15.hook_resid_pre")
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--dead-fraction", type=float, default=0.3, help="latents marked dead (AuxK on them)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rows", type=int, default=25, help="profiler table rows")
    p.add_argument("--by-shape", action="store_true", help="one row per operator and input shapes")
    args = p.parse_args()

    from saekit.config import SaeConfig, TrainConfig
    from saekit.train import Trainer

    if args.activations:
        from saekit.cache import ActivationCache
        from saekit.harvest import massive_mask

        acts = ActivationCache(args.activations).read(hooks=[args.hook]).acts[args.hook]
        acts = acts[~massive_mask(acts.norm(dim=1))]
    else:
        acts = torch.randn(8 * args.batch_size, 576)
    cfg = TrainConfig(saes=[SaeConfig(d_in=acts.shape[1], d_sae=args.d_sae, k=args.k)], batch_size=args.batch_size,
                      epochs=100, dead_tokens=args.batch_size, device="cpu", log_every=10**9)
    trainer = Trainer(cfg, acts, tempfile.mkdtemp(prefix="saekit-prof-"))
    n_dead = int(args.dead_fraction * args.d_sae)

    def step(i: int) -> float:
        since = trainer.since_fired[0]
        since.zero_()
        since[torch.randperm(args.d_sae, generator=torch.Generator().manual_seed(i))[:n_dead]] = 10**9
        t0 = time.perf_counter()
        trainer.train_step(trainer.data.batch(i))
        return time.perf_counter() - t0

    for i in range(2):
        step(i)
    times = [step(i) for i in range(2, 2 + args.steps)]
    med = statistics.median(times)
    print(f"{n_dead} dead latents of {args.d_sae}: median step {med * 1e3:.0f} ms = {args.batch_size / med:,.0f} tok/s "
          f"({torch.get_num_threads()} threads)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
        for i in range(3):
            step(100 + i)
    print(prof.key_averages(group_by_input_shape=args.by_shape).table(sort_by="self_cpu_time_total",
                                                                      row_limit=args.rows))


if __name__ == "__main__":
    main()
