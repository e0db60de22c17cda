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
import tempfile
import time

import torch


def one_process(args: argparse.Namespace) -> None:
    """Time `args.steps` training steps in this process and print them as JSON."""
    from saekit import heap
    from saekit.config import SaeConfig, TrainConfig
    from saekit.train import Trainer

    if args.heap == "default":
        heap.keep_freed_blocks = lambda: False  # the Trainer would set the thresholds
    torch.set_num_threads(args.threads)
    if args.activations:
        from saekit.cache import ActivationCache
        from saekit.harvest import massive_mask

        acts = ActivationCache(args.activations).read(hooks=[args.hook]).acts[args.hook]
        acts = acts[~massive_mask(acts.norm(dim=1))]
    else:
        acts = torch.randn(8 * args.batch_size, 576, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(saes=[SaeConfig(d_in=acts.shape[1], d_sae=args.d_sae, k=args.k)], batch_size=args.batch_size,
                      epochs=100, dead_tokens=args.batch_size, device="cpu", log_every=10**9)
    trainer = Trainer(cfg, acts, tempfile.mkdtemp(prefix="saekit-heap-"))
    walls = []
    for i in range(3 + args.steps):
        if i == 3:  # the first steps warm up the allocator and oneDNN's kernel cache
            r0 = resource.getrusage(resource.RUSAGE_SELF)
        trainer.since_fired[0].zero_()
        t0 = time.perf_counter()
        trainer.train_step(trainer.data.batch(i))
        walls.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall": statistics.median(walls[3:]), "sys": (r1.ru_stime - r0.ru_stime) / args.steps,
                      "faults": (r1.ru_minflt - r0.ru_minflt) / args.steps}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--activations", help="saekit activation cache (default: random activations)")
    p.add_argument("--hook", default="blocks.15.hook_resid_pre")
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
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
