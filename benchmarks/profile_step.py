"""Where saekit's training step spends its time (torch.profiler), at the benchmark shape, with a chosen
fraction of dead latents so that AuxK runs as it does mid-training.

    python benchmarks/profile_step.py --activations /tmp/acts --dead-fraction 0.3
"""

from __future__ import annotations

import argparse
import statistics

import torch
from step_setup import add_step_args, step_trainer, timed_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(p, dead_fraction=0.3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rows", type=int, default=25, help="profiler table rows")
    p.add_argument("--by-shape", action="store_true", help="one row per operator and input shapes")
    args = p.parse_args()

    trainer = step_trainer(args)
    n_dead = int(args.dead_fraction * args.d_sae)

    def step(i: int) -> float:
        return timed_step(trainer, args, i)[0]

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
