"""torch.distributed scale-out on CPU (gloo): data parallel equals one process, resume, dead ranks, the CLI
under torchrun, and distributed modules on the default model (integration)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from saekit.config import DistConfig, SaeConfig, TrainConfig
from saekit.dist import DistributedTrainer, setup, shutdown, split
from saekit.errors import SaekitError
from saekit.sae import load_sae
from saekit.train import Trainer

D_IN = 32

SIZES = [1300, 1700]  # uneven shards on purpose


def synthetic(n: int = sum(SIZES), d: int = D_IN, seed: int = 0) -> torch.Tensor:
    """Sparse combinations of a random dictionary plus an offset (a mean the SAE's b_dec must learn)."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(256, d, generator=g)
    codes = torch.rand(n, 256, generator=g) * (torch.rand(n, 256, generator=g) < 0.03)
    return codes @ dictionary + 3.0 + 0.05 * torch.randn(n, d, generator=g)


def train_config() -> TrainConfig:
    # AuxK on (a short dead window; Gao's W_enc = W_decᵀ init leaves latents dead early here), one TopK and
    # one BatchTopK SAE: every reduced quantity is exercised.
    return TrainConfig(saes=[SaeConfig(d_in=D_IN, d_sae=128, k=4), SaeConfig(d_in=D_IN, d_sae=96, k=4, architecture="batchtopk")],
                       batch_size=256, epochs=3, warmup_steps=5, dead_tokens=512, enc_init_scale=1.0, log_every=5,
                       device="cpu", seed=3)


def _dp_rank(rank: int, world: int, store: str, out: str, stop_at: int) -> None:
    torch.set_num_threads(1)
    comm = setup(DistConfig(dist_timeout=60), "cpu", rank, world, f"file://{store}")
    lo = sum(SIZES[:rank])
    shard = synthetic()[lo: lo + SIZES[rank]]
    first = DistributedTrainer(train_config(), shard, out, comm)
    first.fit(progress=False, stop_after=stop_at)  # stop part-way, then resume in a fresh trainer
    DistributedTrainer(train_config(), shard, out, comm, resume=True).fit(progress=False)
    shutdown()


def test_two_processes_train_the_same_sae_as_one(tmp_path):
    ref = Trainer(train_config(), synthetic(), tmp_path / "one").fit(progress=False)
    mp.start_processes(_dp_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "two"), 7), nprocs=2,
                       start_method="spawn")
    for path in ref:
        a, b = load_sae(path), load_sae(tmp_path / "two" / path.name)
        for name, t in a.weights().items():
            torch.testing.assert_close(b.weights()[name], t, rtol=1e-4, atol=2e-5, msg=f"{path.name} {name}")
        assert b.info["distributed"] == {"mode": "data", "world_size": 2, "backend": "gloo"}
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in two}  # rank 0 alone wrote; the resumed run appended (step 7 is the stop)
    assert sorted(by_step) == sorted({r["step"] for r in one} | {7})
    for r1 in one:
        r2 = by_step[r1["step"]]
        assert r2["k4-d128/fvu"] == pytest.approx(r1["k4-d128/fvu"], rel=1e-3)
        assert r2["btk4-d96/l0"] == pytest.approx(r1["btk4-d96/l0"], rel=1e-3)
    assert max(r["k4-d128/dead_fraction"] for r in one) > 0  # AuxK really ran


def _failing_rank(rank: int, world: int, store: str, out: str, how: str, q) -> None:
    import torch._dynamo  # noqa: F401  (imported lazily by the optimizer: keep it out of the timed section)

    torch.set_num_threads(1)
    comm = setup(DistConfig(dist_timeout=8), "cpu", rank, world, f"file://{store}")

    class Failing(DistributedTrainer):
        def train_step(self, batch):
            if self.comm.rank == 1 and self.step == 3:
                if how == "dies":
                    os._exit(3)
                time.sleep(120)  # stuck: alive, but never joins the next collective
            return super().train_step(batch)

    lo = sum(SIZES[:rank])
    try:
        trainer = Failing(train_config(), synthetic()[lo: lo + SIZES[rank]], out, comm)
        start = time.perf_counter()
        trainer.fit(progress=False)
        q.put((how, rank, "finished", 0.0))
    except SaekitError as e:
        q.put((how, rank, str(e), time.perf_counter() - start))


def test_a_dead_or_stuck_rank_stops_the_others_with_a_clear_error(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_failing_rank, args=(r, 2, str(tmp_path / f"store-{how}"), str(tmp_path / how), how, q))
             for how in ("dies", "hangs") for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = {}
        for _ in range(2):
            how, rank, msg, seconds = q.get(timeout=120)
            results[how] = (rank, msg, seconds)
    finally:
        for p in procs:
            p.kill()
            p.join()
    for how, (rank, msg, _) in results.items():
        assert rank == 0, (how, msg)
        assert msg.startswith("rank 0 of 2: reducing") and "Another process has probably died or is stuck" in msg, msg
        assert "--dist-timeout" in msg
    assert results["dies"][2] < 8  # a closed connection is noticed at once
    assert 7 < results["hangs"][2] < 60  # a silent peer after the 8 s timeout
    assert not (tmp_path / "dies" / "k4-d128").exists()


def test_torchrun_cli_matches_one_process_on_a_cache(tmp_path):
    from saekit.cache import ActivationCache
    from saekit.cli import main
    from saekit.harvest import Harvest

    x = synthetic()
    x[[5, 2000]] *= 200  # a massive token in each rank's slice: excluded by the global median
    n = len(x)
    harvest = Harvest({"blocks.1.hook_resid_pre": x}, torch.arange(n) % 100, torch.arange(n) % 127 + 1,
                      torch.arange(n) // 127, {"tokens": n})
    ActivationCache.write(tmp_path / "cache", harvest, {"model": "synthetic", "dataset": "synthetic"}, shard_tokens=1000)
    args = ["train", "--activations", str(tmp_path / "cache"), "--no-eval", "--k", "4", "--d-sae", "128",
            "--batch-size", "256", "--epochs", "2", "--device", "cpu", "--dead-tokens", "512"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "saekit", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 massive tokens of 3000" in run.stdout and "on 2 processes" in run.stdout
    a, b = load_sae(tmp_path / "one" / "k4-d128"), load_sae(tmp_path / "two" / "k4-d128")
    for name, t in a.weights().items():
        torch.testing.assert_close(b.weights()[name], t, rtol=1e-4, atol=2e-5)
    assert b.info["massive_tokens_excluded"] == 2 and b.info["harvest_tokens"] == 3000


def test_split_and_cache_slices(tmp_path):
    from saekit.cache import ActivationCache
    from saekit.harvest import Harvest

    assert split(10, 3) == [4, 3, 3] and sum(split(7, 4)) == 7
    x = torch.randn(250, 4, generator=torch.Generator().manual_seed(0))
    n = len(x)
    cache = ActivationCache.write(tmp_path, Harvest({"h": x}, torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long),
                                                    torch.zeros(n, dtype=torch.long), {}), {}, shard_tokens=64)
    for lo, hi in [(0, 250), (60, 70), (63, 129), (200, 250), (10, 10)]:
        assert torch.equal(cache.slice(lo, hi)["h"], x[lo:hi])


@pytest.mark.integration
def test_distributed_modules_train_one_hook_per_process(tmp_path):
    """`saekit train --distributed`: launches 2 processes; each harvests half the tokens for both hooks,
    then each trains the SAE of one hook on all tokens."""
    hooks = ["blocks.3.hook_resid_pre", "blocks.6.hook_resid_pre"]
    run = subprocess.run([sys.executable, "-m", "saekit", "train", "--distributed", "--nproc-per-node", "2",
                          "--distribute-modules", "--hooks", ",".join(hooks), "--tokens", "2048", "--k", "8",
                          "--d-sae", "256", "--batch-size", "256", "--epochs", "1", "--no-eval", "--device", "cpu",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank, hook in enumerate(hooks):
        sae = load_sae(tmp_path / hook / "k8-d256")
        assert sae.hook == hook and sae.info["harvest_tokens"] == 2048
        assert sae.info["distributed"]["mode"] == "modules"
        assert f"[rank {rank}] trained 1 dictionary on {hook}" in run.stdout
    from saekit.cache import ActivationCache

    cache = ActivationCache(tmp_path / "activations").read()  # one ordinary cache, written by both ranks
    assert len(cache) == 2048 and list(cache.acts) == hooks
    for hook in hooks:  # one massive threshold per hook, over both ranks' tokens, recorded once
        norms = cache.acts[hook].norm(dim=1)
        assert cache.meta["massive"][hook]["median_norm"] == pytest.approx(float(norms.median()))
