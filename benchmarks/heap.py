"""The training step with glibc's default heap against `saekit.heap.keep_freed_blocks`, in alternating processes
(a heap setting lasts for its process, so the two cannot share one). Prints each process's median step, its kernel
time and its page faults a step, then the medians of both.

    python benchmarks/heap.py --activations /tmp/acts-l15 --processes 6
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

import torch
from step_setup import add_step_args, step_trainer, timed_step


def one_process(args: argparse.Namespace) -> None:
    """Time `args.steps` training steps in this process and print them as JSON."""
    from saekit import heap

    if args.heap == "default":
        heap.keep_freed_blocks = lambda: False  # the Trainer would set the thresholds
    torch.set_num_threads(args.threads)
    trainer = step_trainer(args)
    walls = []
    for i in range(3 + args.steps):
        if i == 3:  # the first steps warm up the allocator and oneDNN's kernel cache
            r0 = resource.getrusage(resource.RUSAGE_SELF)
        walls.append(timed_step(trainer, args, i)[0])
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall": statistics.median(walls[3:]), "sys": (r1.ru_stime - r0.ru_stime) / args.steps,
                      "faults": (r1.ru_minflt - r0.ru_minflt) / args.steps}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(p, dead_fraction=0.0)
    p.add_argument("--steps", type=int, default=20, help="timed steps per process")
    p.add_argument("--processes", type=int, default=6, help="processes per heap setting, alternating")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--heap", choices=["default", "kept"], help=argparse.SUPPRESS)  # one measuring process
    args = p.parse_args()
    if args.heap:
        return one_process(args)
    runs: dict[str, list[dict]] = {"default": [], "kept": []}
    for i in range(args.processes):
        for setting in runs:
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--heap", setting], capture_output=True,
                                 text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            runs[setting].append(r)
            print(f"  {setting:8s} process {i + 1}: {r['wall'] * 1e3:6.1f} ms/step, kernel {r['sys'] * 1e3:5.1f} ms, "
                  f"{r['faults']:7,.0f} page faults a step")
    base = statistics.median(r["wall"] for r in runs["default"])
    for setting, rs in runs.items():
        w = statistics.median(r["wall"] for r in rs)
        print(f"{setting:8s} median {w * 1e3:6.1f} ms/step  × default {base / w:.3f}  "
              f"page faults a step {statistics.median(r['faults'] for r in rs):,.0f}")


if __name__ == "__main__":
    main()
