"""Transcoders: saekit's training step against sparsify's, saekit's inits, and the all-layer harvest.

Three parts, one per invocation:
  (default)      saekit and sparsify each train one transcoder (d_sae 4608, k 32, batch 4096, Adam, one lr and
                 schedule, AuxK on) on the same cached (MLP input, MLP output) pairs of one layer, in the same
                 token order, with its own step: saekit.train.Trainer.train_step, and sparsify's SparseCoder
                 (transcode=True) + the body of sparsify.Trainer's hook and step (its transcoder init: W_dec = 0,
                 b_enc centring the pre-activations, b_dec = the target's mean; no decoder renormalisation).
                 --skip: skip-transcoders on both sides. Interleaved runs, one subprocess each (sparsify with
                 .venv-peers's python), as benchmarks/peers.py; repeat r initialises both with seed --seed + r.
                 --saekit-init picks saekit's init (default: TrainConfig's default transcoder_init).
  --inits        saekit only: its transcoder_init values (zero_decoder = sparsify's init, independent, tied) and
                 three variants written into its trainer here (centred: independent + sparsify's centring b_enc;
                 zero-dec: independent + W_dec = 0; uncentred: zero_decoder without the centring) × seeds, same
                 tokens; held-out FVU against the seed spread.
  --harvest-all  `saekit harvest --layers all --mlp-pairs --tokens 100000 --storage-dtype float16`: wall time,
                 tokens/s, peak RSS of the process, size on disk.

Held-out data: the last --heldout-fraction of the cache's contexts, whole (as peers.py). Massive tokens (either
hook's norm over the threshold recorded at harvest) are left out of training, as `saekit train` does. FVU is of
the MLP output, about its mean, on held-out normal tokens.

    saekit harvest --layers 6 --mlp-pairs --tokens 65536 --out /tmp/tc-acts-l6
    python benchmarks/transcoders.py --activations /tmp/tc-acts-l6 --json runs/bench/tc.json
    python benchmarks/transcoders.py --activations /tmp/tc-acts-l6 --inits --json runs/bench/tc-inits.json
    python benchmarks/transcoders.py --harvest-all --json runs/bench/tc-harvest.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import TIMING_SKIP, _machine, _versions, fvu, lr_factor, summarize, table, unshadow_packages  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# saekit's own (TrainConfig.transcoder_init), and variants this benchmark writes into its trainer (_variant_init),
# each named with the saekit init it starts from.
OWN_INITS = ("zero_decoder", "independent", "tied")
VARIANTS = {"centred": "independent", "zero-dec": "independent", "uncentred": "zero_decoder"}
INITS = OWN_INITS + tuple(VARIANTS)


@torch.no_grad()
def tc_quality(encode, predict, x: torch.Tensor, y: torch.Tensor, normal: torch.Tensor, d_sae: int,
               chunk: int = 4096) -> dict[str, float]:
    """FVU of the target y (about its mean; sums over all tokens), L0 and dead fraction on held-out pairs.
    `encode(x) -> (values, indices)` and `predict(x) -> ŷ` are the library's own."""
    y_hat = torch.cat([predict(x[i: i + chunk]).float() for i in range(0, len(x), chunk)])
    fires = torch.zeros(d_sae, dtype=torch.long)
    active = 0
    for i in range(0, len(x), chunk):
        v, idx = encode(x[i: i + chunk])
        on = v > 0
        active += int(on.sum())
        fires += torch.bincount(idx[on].flatten(), minlength=d_sae)
    return {"fvu": fvu(y[normal], y_hat[normal]), "fvu_with_massive": fvu(y, y_hat), "l0": active / len(x),
            "dead_heldout": (fires == 0).float().mean().item(), "heldout_tokens": len(x)}


# ----------------------------------------------------------------------------- the training loops

def run_saekit(job: dict, data: dict[str, torch.Tensor], device: torch.device):
    from saekit import ops
    from saekit.config import SaeConfig, TrainConfig
    from saekit.train import Trainer

    rows, d, B, steps = data["rows"], job["d_in"], job["batch_size"], job["steps"]
    cfg = TrainConfig(saes=[SaeConfig(d_in=d, d_sae=job["d_sae"], k=job["k"], transcoder=True, skip=job["skip"],
                                      d_out=rows.shape[1] - d)],
                      batch_size=B, epochs=1.0, lr=job["lr"], warmup_steps=job["warmup_steps"],
                      decay_fraction=job["decay_fraction"], auxk_coef=job["auxk_coef"] if job["auxk"] else 0.0,
                      dead_tokens=job["dead_tokens"], seed=job["seed"], device=str(device), log_every=10**9,
                      transcoder_init=VARIANTS.get(job["init"], job["init"]))
    cfg = dataclasses.replace(cfg, **job["saekit_set"])  # recipe experiments: --saekit-set grad_clip=0
    # The Trainer's first 65,536 rows (input and target scales) are those of the shared order, as the peer's.
    head = rows[data["order"][:65536]]
    trainer = Trainer(cfg, head, tempfile.mkdtemp(prefix="saekit-tc-bench-"), info={"hook": job["hook"]})
    trainer.total_steps = steps  # the schedule's length, exactly
    if job["init"] in VARIANTS:
        _variant_init(trainer, job["init"], rows[data["order"][:B], :d] * trainer.scale)
    aux_steps = 0

    def step(batch: torch.Tensor) -> None:
        nonlocal aux_steps
        stats = trainer.train_step(batch)
        trainer.step += 1
        aux_steps += stats[0]["dead_fraction"] > 0 and job["auxk"]

    def finish():
        sae = trainer.trained_sae(0).cpu()  # folded: raw MLP input → raw MLP output
        return ((lambda x: sae.encode(x)), sae, 1.0, 1.0,
                {"dead_train": (trainer.since_fired[0] >= trainer.dead_tokens).float().mean().item(),
                 "aux_steps": aux_steps, "input_scale": trainer.scale, "target_scale": trainer.target_scale,
                 "path": ops.training_path(device), "selection_recomputed_fraction": ops.recomputed_fraction()})

    return step, finish


@torch.no_grad()
def _variant_init(trainer, init: str, first_x: torch.Tensor) -> None:
    """A variant of one of saekit's inits, written into its trainer before the first step (Adam holds no state).
    "centred": independent with b_enc = −mean(x)·W_enc, centring the first batch's pre-activations (sparsify's
    first-step bias; an SAE gets the same from subtracting b_dec from x). "zero-dec": independent with W_dec = 0
    (saekit's renormalisation leaves a zero row at zero until it gets a gradient, so each row starts along its
    first gradient). "uncentred": zero_decoder with b_enc = 0."""
    sae = trainer.saes[0]
    if init == "centred":
        sae.b_enc.copy_(-first_x.mean(0) @ sae.W_enc)
    elif init == "zero-dec":
        sae.W_dec.zero_()
    elif init == "uncentred":
        sae.b_enc.zero_()


def run_sparsify(job: dict, data: dict[str, torch.Tensor], device: torch.device):
    from sparsify import SparseCoder, SparseCoderConfig

    d, sx, sy = job["d_in"], job["input_scale"], job["target_scale"]
    torch.manual_seed(job["seed"])
    sae = SparseCoder(d, SparseCoderConfig(num_latents=job["d_sae"], k=job["k"], transcode=True,
                                           skip_connection=job["skip"]), device, dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=job["lr"])  # sparsify's "adam" optimizer (no bitsandbytes)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, job["steps"], job["warmup_steps"], job["decay_fraction"]))
    since = torch.zeros(sae.num_latents, dtype=torch.long, device=device)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool, device=device)
    alpha = job["auxk_coef"] if job["auxk"] else 0.0
    state = {"step": 0, "aux_steps": 0}

    def step(batch: torch.Tensor) -> None:  # sparsify.Trainer.fit's hook + step body (transcode, loss_fn "fvu")
        x, y = batch[:, :d] * sx, batch[:, d:] * sy
        if state["step"] == 0:  # its first-step init: centred pre-activations, b_dec = the target's mean
            sae.encoder.bias.data = -x.mean(0) @ sae.encoder.weight.data.T
            sae.b_dec.data = y.mean(0).to(sae.dtype)
        # a transcoder's decoder is neither renormalised nor gradient-projected in sparsify.Trainer
        dead_mask = since > job["dead_tokens"] if alpha > 0 else None
        state["aux_steps"] += bool(dead_mask is not None and dead_mask.any())
        total_variance = (y - y.mean(0)).pow(2).sum()
        out = sae(x=x, y=y, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach())  # its logging reads these every step
        if alpha > 0:
            float(out.auxk_loss.detach())
        (out.fvu + alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        with torch.no_grad():
            since.add_(len(x))
            since[did_fire] = 0
            did_fire.zero_()
        state["step"] += 1

    def finish():
        def encode(x):
            out = sae.encode(x)
            return out.top_acts, out.top_indices

        return encode, (lambda x: sae(x).sae_out), sx, sy, {
            "dead_train": (since > job["dead_tokens"]).float().mean().item(), "aux_steps": state["aux_steps"]}

    return step, finish


RUNNERS = {"saekit": run_saekit, "sparsify": run_sparsify}


def worker(job_path: str) -> None:
    unshadow_packages()
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    data = {k: v.to(device) for k, v in load_file(job["data"]).items()}
    step, finish = RUNNERS[job["lib"]](job, data, device)
    B, order, rows = job["batch_size"], data["order"], data["rows"]
    times, cpu_times = [], []
    start = time.perf_counter()
    for i in range(job["steps"]):
        batch = rows[order[i * B: (i + 1) * B]]  # gathered outside the timed step, alike for both libraries
        t0, c0 = time.perf_counter(), time.process_time()
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    wall = time.perf_counter() - start
    encode, predict, sx, sy, extra = finish()
    x, y = data["heldout_x"].cpu() * sx, data["heldout_y"].cpu() * sy  # FVU, L0 and dead ignore the scales
    med, cmed = statistics.median(times[TIMING_SKIP:] or times), statistics.median(cpu_times[TIMING_SKIP:] or cpu_times)
    result = {"lib": job["label"], "repeat": job["repeat"], "seed": job["seed"], "init": job["init"],
              "steps": job["steps"], "tokens": job["steps"] * B, "median_step_s": med, "tokens_per_s": B / med,
              "mean_tokens_per_s": B * len(times) / wall, "tokens_per_cpu_s": B / cmed, "step_times": times,
              "cpu_step_times": cpu_times, **tc_quality(encode, predict, x, y, data["heldout_normal"].cpu().bool(),
                                                        job["d_sae"]),
              **extra, "versions": _versions(job["lib"])}
    Path(job["result"]).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- orchestration

def prepare(args) -> tuple[Path, dict[str, Any]]:
    """One layer's pairs: held-out contexts split off whole, massive tokens dropped from training, the token
    order fixed (saekit's own seeded permutation per epoch), one file every worker reads."""
    from saekit.cache import ActivationCache
    from saekit.lm import MLP_IN, MLP_OUT
    from saekit.train import InMemoryBatches, input_scale

    cache = ActivationCache(args.activations)
    hooks = [f"blocks.{args.layer}.{MLP_IN}", f"blocks.{args.layer}.{MLP_OUT}"]
    missing = [h for h in hooks if h not in cache.hooks]
    if missing:
        raise SystemExit(f"{args.activations} lacks {missing} (it holds {cache.hooks[:6]}…): harvest with "
                         f"`saekit harvest --layers {args.layer} --mlp-pairs` or pass --layer.")
    harvest = cache.read(hooks=hooks)
    x, y, ctx = harvest.acts[hooks[0]], harvest.acts[hooks[1]], harvest.context_ids
    contexts = torch.unique(ctx)
    held = torch.isin(ctx, contexts[int(len(contexts) * (1 - args.heldout_fraction)):])
    massive = torch.zeros(len(x), dtype=torch.bool)
    for h, a in zip(hooks, (x, y)):
        massive |= a.norm(dim=1) > cache.massive_threshold(h)
    rows = torch.cat([x, y], 1)[~held & ~massive]
    steps = int(args.epochs * len(rows)) // args.batch_size
    batches = InMemoryBatches(rows, args.batch_size, args.seed)
    order = torch.cat([batches.step_indices(s) for s in range(steps)])
    normal = ~massive[held][: args.heldout_tokens]
    path = Path(args.workdir) / "data.safetensors"
    save_file({"rows": rows.contiguous(), "order": order.contiguous(),
               "heldout_x": x[held][: args.heldout_tokens].contiguous(),
               "heldout_y": y[held][: args.heldout_tokens].contiguous(), "heldout_normal": normal.to(torch.uint8)},
              str(path))
    ordered = rows[order[:65536]]
    d = x.shape[1]
    info = {"activations": str(args.activations), "hook": hooks[0], "hook_out": hooks[1], "d_in": d,
            "d_out": y.shape[1], "cache_tokens": len(x), "storage_dtype": cache.manifest.get("storage_dtype"),
            "train_tokens_available": len(rows), "massive_excluded": int((massive & ~held).sum()), "steps": steps,
            "train_tokens": steps * args.batch_size, "heldout_tokens": int(len(normal)),
            "heldout_massive": int((~normal).sum()), "input_scale": input_scale(ordered[:, :d]),
            "target_scale": input_scale(ordered[:, d:]), "model": harvest.meta.get("model"),
            "linear_fvu": _linear_fvu(rows[:, :d], rows[:, d:], x[held][: args.heldout_tokens],
                                      y[held][: args.heldout_tokens], normal)}
    return path, info


def _linear_fvu(x: torch.Tensor, y: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor, normal: torch.Tensor) -> float:
    """Held-out FVU of the least-squares affine map x → y on the training rows: what a dense linear MLP
    stand-in reaches (a reference for the skip path, not a target)."""
    one = torch.ones(len(x), 1, dtype=torch.float64)
    W = torch.linalg.lstsq(torch.cat([x.double(), one], 1), y.double()).solution
    pred = torch.cat([hx.double(), torch.ones(len(hx), 1, dtype=torch.float64)], 1) @ W
    return fvu(hy[normal], pred[normal])


def run_one(lib: str, label: str, init: str, repeat: int, args, data: Path, info: dict[str, Any]) -> dict[str, Any]:
    job = {"lib": lib, "label": label, "init": init, "repeat": repeat, "data": str(data), "steps": info["steps"],
           "batch_size": args.batch_size, "d_in": info["d_in"], "d_sae": args.d_sae, "k": args.k, "lr": args.lr,
           "warmup_steps": args.warmup_steps, "decay_fraction": args.decay_fraction, "auxk": args.auxk,
           "auxk_coef": 1 / 32, "dead_tokens": info["dead_tokens"], "seed": args.seed + repeat, "skip": args.skip,
           "input_scale": info["input_scale"], "target_scale": info["target_scale"], "hook": info["hook"],
           "threads": args.threads, "device": args.device, "saekit_set": args.saekit_set,
           "result": str(Path(args.workdir) / f"{label}-{repeat}.json")}
    job_path = Path(args.workdir) / f"{label}-{repeat}.job.json"
    job_path.write_text(json.dumps(job))
    python = sys.executable if lib == "saekit" else args.peers_python
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "SPARSIFY_DISABLE_TRITON": "1",
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    t0, load = time.perf_counter(), os.getloadavg()[0]
    run = subprocess.run([python, str(Path(__file__).resolve()), "--worker", str(job_path)], env=env,
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{label} worker failed (exit {run.returncode}):\n{run.stderr[-4000:]}")
    result = json.loads(Path(job["result"]).read_text())
    # the 1-minute load average before and after: others' jobs share the 2 cores and slow single runs 3-5x
    result |= {"process_s": time.perf_counter() - t0, "load_before": load, "load_after": os.getloadavg()[0]}
    return result


def init_table(results: list[dict[str, Any]], inits: list[str]) -> tuple[dict[str, Any], str]:
    """Held-out FVU per init and seed; each init's mean, seed spread, and its gap to the best against the
    seed spread (paired by seed: the same seed means the same token order and run)."""
    seeds = sorted({r["seed"] for r in results})
    by = {(r["init"], r["seed"]): r for r in results}
    rows = {}
    for init in inits:
        f = [by[(init, s)]["fvu"] for s in seeds]
        rows[init] = {"fvu_by_seed": f, "fvu_mean": statistics.mean(f), "fvu_sd": statistics.stdev(f) if len(f) > 1
                      else float("nan"), "fvu_min": min(f), "fvu_max": max(f),
                      "l0": statistics.mean(by[(init, s)]["l0"] for s in seeds),
                      "dead_heldout": statistics.mean(by[(init, s)]["dead_heldout"] for s in seeds),
                      "dead_train": statistics.mean(by[(init, s)]["dead_train"] for s in seeds),
                      "tokens_per_s": statistics.median(by[(init, s)]["tokens_per_s"] for s in seeds)}
    best = min(inits, key=lambda i: rows[i]["fvu_mean"])
    for init in inits:
        diffs = [a - b for a, b in zip(rows[init]["fvu_by_seed"], rows[best]["fvu_by_seed"])]
        rows[init]["minus_best"] = statistics.mean(diffs)
        rows[init]["minus_best_by_seed"] = diffs
    head = (f"{'init':<13}{'FVU mean':>10}{'sd over seeds':>15}{'min–max':>17}{'− best (paired, per seed)':>40}"
            f"{'L0':>7}{'dead held':>10}{'dead train':>11}{'tok/s':>9}")
    lines = [head, "-" * len(head)]
    for init, r in rows.items():
        per_seed = " / ".join(f"{v:+.4f}" for v in r["minus_best_by_seed"])
        lines.append(f"{init:<13}{r['fvu_mean']:>10.4f}{r['fvu_sd']:>15.4f}{r['fvu_min']:>9.4f}–{r['fvu_max']:<7.4f}"
                     f"{per_seed:>40}{r['l0']:>7.1f}{r['dead_heldout']:>10.1%}{r['dead_train']:>11.1%}"
                     f"{r['tokens_per_s']:>9,.0f}")
    return {"best": best, "rows": rows}, "\n".join(lines)


def harvest_all(args) -> dict[str, Any]:
    """`saekit harvest --layers all --mlp-pairs` in a subprocess: wall time, tokens/s, peak RSS (wait4: this
    child's own maximum), and the cache's size on disk."""
    out = Path(args.harvest_dir)
    cmd = [str(ROOT / ".venv" / "bin" / "saekit"), "harvest", "--layers", "all", "--mlp-pairs", "--tokens",
           str(args.harvest_tokens), "--storage-dtype", args.storage_dtype, "--device", args.device, "--out", str(out),
           "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"the harvest failed (exit {proc.returncode}); its output is above.")
    manifest = json.loads((out / "manifest.json").read_text())
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    result = {"command": " ".join(cmd), "wall_s": wall, "tokens": manifest["tokens"],
              "tokens_per_s_wall": manifest["tokens"] / wall, "harvest_tokens_per_s": manifest["harvest"]["tokens_per_s"],
              "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9, "cpu_s": usage.ru_utime + usage.ru_stime,
              "disk_gb": size / 1e9, "hooks": len(manifest["hooks"]), "shards": len(manifest["shards"]),
              "storage_dtype": manifest["storage_dtype"], "mlp_pair_error_max": max(manifest.get("mlp_pair_error", {0: 0}).values())}
    if not args.keep_harvest:
        shutil.rmtree(out)
        result["removed"] = True
    return result


def cpu_line() -> str:
    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return f"{_machine()}; avx512_bf16 {'yes' if ' avx512_bf16' in flags else 'no'}; load {os.getloadavg()[0]:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--activations", default="/tmp/tc-acts-l6", help="a cache with MLP pairs (saekit harvest "
                                                                    "--layers L --mlp-pairs --out DIR)")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--inits", action="store_true", help="compare saekit's transcoder inits instead of the libraries")
    p.add_argument("--init-list", default=",".join(INITS), help=f"with --inits: a comma list of {', '.join(INITS)}")
    p.add_argument("--saekit-init", default=None, help="saekit's init against sparsify (default: TrainConfig's "
                                                        f"default transcoder_init); one of {', '.join(INITS)}")
    p.add_argument("--harvest-all", action="store_true", help="time and measure a --layers all --mlp-pairs harvest")
    p.add_argument("--harvest-dir", default="/tmp/saekit-tc-harvest-all")
    p.add_argument("--harvest-tokens", type=int, default=100_000)
    p.add_argument("--storage-dtype", default="float16")
    p.add_argument("--keep-harvest", action="store_true", help="keep the --harvest-all cache (default: removed)")
    p.add_argument("--skip", action="store_true", help="skip-transcoders (a dense W_skip path) on every side")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per library / seeds per init")
    p.add_argument("--epochs", type=float, default=5.0, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="default saekit's: 8 × 2e-4·sqrt(2^14/d_sae)")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--decay-fraction", type=float, default=0.2)
    p.add_argument("--auxk", action=argparse.BooleanOptionalAction, default=True, help="AuxK on (default) or off")
    p.add_argument("--dead-tokens", type=int, default=None, help="default training tokens/10, for every run")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="last fraction of contexts held out")
    p.add_argument("--heldout-tokens", type=int, default=32768)
    p.add_argument("--seed", type=int, default=0, help="token order; repeat r inits with seed + r")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--peers-python", default=str(ROOT / ".venv-peers" / "bin" / "python"))
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--saekit-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a saekit TrainConfig field for saekit's runs (recipe experiments; repeatable)")
    p.add_argument("--json", help="write the table and every run here")
    args = p.parse_args()
    if args.worker:
        worker(args.worker)
        return
    from saekit.config import TrainConfig, parse_override

    args.saekit_set = dict(parse_override(s) for s in args.saekit_set)
    args.saekit_init = args.saekit_init or TrainConfig.transcoder_init

    from saekit.files import write_json
    from saekit.sae import lr_rule

    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": cpu_line(),
                           "command": " ".join(sys.argv), "config": {k: v for k, v in vars(args).items() if k != "worker"}}
    print(f"CPU: {out['machine']}; {args.threads} threads", flush=True)
    if args.harvest_all:
        r = harvest_all(args)
        out["harvest_all"] = r
        print(f"\n--layers all --mlp-pairs harvest, {r['tokens']:,} tokens, {r['hooks']} hooks, {r['storage_dtype']}: "
              f"{r['wall_s']:.0f} s wall ({r['tokens_per_s_wall']:,.0f} tok/s; the harvest's own count "
              f"{r['harvest_tokens_per_s']:,.0f} tok/s), {r['cpu_s']:.0f} CPU s, peak RSS {r['peak_rss_gb']:.2f} GB "
              f"(target ≤ 8), {r['disk_gb']:.2f} GB on disk in {r['shards']} shards; largest MLP-pair check error "
              f"{r['mlp_pair_error_max']:.2g}{' (cache removed)' if r.get('removed') else ''}")
    else:
        if not args.inits and not Path(args.peers_python).is_file():
            raise SystemExit(f"no peers python at {args.peers_python}: run `make peers` or pass --peers-python.")
        if not Path(args.activations).is_dir():
            raise SystemExit(f"no activation cache at {args.activations}: run `saekit harvest --layers {args.layer} "
                             f"--mlp-pairs --tokens 65536 --out {args.activations}`.")
        args.lr = args.lr or 8 * lr_rule(args.d_sae)
        args.workdir = args.workdir or tempfile.mkdtemp(prefix="saekit-tc-")
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        data, info = prepare(args)
        info["dead_tokens"] = args.dead_tokens or max(args.batch_size, min(10_000_000, info["train_tokens"] // 10))
        out["data"] = info
        kind = "skip-transcoders" if args.skip else "transcoders"
        print(f"{kind} on {info['hook']} → {info['hook_out']}: {info['train_tokens']:,} training tokens "
              f"({info['steps']} steps of {args.batch_size}, {args.epochs:g} epochs over "
              f"{info['train_tokens_available']:,}), {info['heldout_tokens']:,} held-out tokens "
              f"({info['heldout_massive']} massive), lr {args.lr:.3g}, AuxK {'on' if args.auxk else 'off'}, dead after "
              f"{info['dead_tokens']:,} tokens; affine least-squares x→y held-out FVU {info['linear_fvu']:.4f}", flush=True)
        runs = ([("saekit", init, init) for init in args.init_list.split(",") if init] if args.inits
                else [("saekit", "saekit", args.saekit_init), ("sparsify", "sparsify", "sparsify")])
        unknown = [i for lib, _, i in runs if lib == "saekit" and i not in INITS]
        if unknown:
            raise SystemExit(f"unknown init(s) {unknown}: choose from {', '.join(INITS)}.")
        results = []
        for rep in range(args.repeats):
            for lib, label, init in runs:
                r = run_one(lib, label, init, rep, args, data, info)
                results.append(r)
                print(f"  run {rep + 1}/{args.repeats} {label:<12} {r['tokens_per_s']:>8,.0f} tok/s  fvu {r['fvu']:.4f}  "
                      f"L0 {r['l0']:.1f}  dead {r['dead_heldout']:.1%}  ({r['process_s']:.0f} s, load {r['load_before']:.1f}"
                      f"→{r['load_after']:.1f})", flush=True)
        print()
        if args.inits:
            out["inits"], text = init_table(results, [label for _, label, _ in runs])
            print(text)
            print(f"\nFVU of {info['hook_out']} on {info['heldout_tokens']:,} held-out tokens (normal), seeds "
                  f"{args.seed}–{args.seed + args.repeats - 1}, one token order. Best: {out['inits']['best']}.")
        else:
            out["table"] = summarize(results, ["saekit", "sparsify"])
            print(table(out["table"]))
            sk, sp = (out["table"][lib] for lib in ("saekit", "sparsify"))
            print(f"\nsaekit × = saekit tokens/s ÷ sparsify's (medians over {args.repeats} interleaved runs, each its "
                  f"median over steps {TIMING_SKIP}+): {sp['saekit_speedup']:.2f} wall, "
                  f"{sp['saekit_speedup_cpu_time']:.2f} CPU time (target ≥ 1.5). FVU of {info['hook_out']} on held-out "
                  f"normal tokens: saekit {sk['fvu_min']:.4f}–{sk['fvu_max']:.4f}, sparsify {sp['fvu_min']:.4f}–"
                  f"{sp['fvu_max']:.4f} over seeds. saekit's init: {args.saekit_init}; its path: {results[0].get('path')}.")
        out["runs"] = results
    if args.json:
        write_json(args.json, out)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
