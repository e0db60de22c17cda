"""The training step that profile_step.py, step_speed.py and heap.py time: one SAE at the benchmark shape over
cached activations (massive tokens left out) or seeded random ones, and a step with a chosen share of latents
marked dead so that AuxK runs as it does mid-training."""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def add_step_args(p: argparse.ArgumentParser, dead_fraction: float) -> None:
    p.add_argument("--activations", help="saekit activation cache (default: random activations)")
    p.add_argument("--hook", default="blocks.15.hook_resid_pre")
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--dead-fraction", type=float, default=dead_fraction, help="latents marked dead (AuxK trains them)")


def step_trainer(args: argparse.Namespace):
    """A Trainer over the activations `args` name, on the CPU."""
    from saekit.config import SaeConfig, TrainConfig
    from saekit.train import Trainer

    if args.activations:
        from saekit.cache import ActivationCache
        from saekit.harvest import massive_mask

        acts = ActivationCache(args.activations).read(hooks=[args.hook]).acts[args.hook]
        acts = acts[~massive_mask(acts.norm(dim=1))]
    else:
        acts = torch.randn(8 * args.batch_size, 576, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(saes=[SaeConfig(d_in=acts.shape[1], d_sae=args.d_sae, k=args.k)], batch_size=args.batch_size,
                      epochs=100, dead_tokens=args.batch_size, device="cpu", log_every=10**9)
    return Trainer(cfg, acts, tempfile.mkdtemp(prefix="saekit-step-"))


def timed_step(trainer, args: argparse.Namespace, i: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of step i on batch i, with `args.dead_fraction` of the latents dead (seeded by i)."""
    since = trainer.since_fired[0]
    since.zero_()
    n_dead = int(args.dead_fraction * args.d_sae)
    since[torch.randperm(args.d_sae, generator=torch.Generator().manual_seed(i))[:n_dead]] = 10**9
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train_step(trainer.data.batch(i))
    return time.perf_counter() - t0, time.process_time() - c0
