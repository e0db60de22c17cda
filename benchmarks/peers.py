"""saekit against SAELens and sparsify: the same activations, configuration and token order.

Each library trains one TopK SAE (d_sae 4608, k 32, batch 4096, Adam, one lr and schedule, AuxK on where the
library has it) on the same cached activations of the default model, in the same batch order, with its own
training step:
  saekit    saekit.train.Trainer.train_step
  SAELens   TopKTrainingSAE + SAETrainer.step (its trainer's loop body)
  sparsify  SparseCoder + the body of sparsify.Trainer's step (loss_fn "fvu"), which lives inside a model hook
The runs are interleaved (A B C A B C …), each in its own subprocess: saekit with this python, the peers
with .venv-peers's (`make peers`; sae-lens pins transformer-lens < 4). Reported: the median over repeats
of each run's median step throughput, its ratio to saekit, and FVU / L0 / dead fraction on held-out
activations (whole contexts the training never saw) after the same tokens. Repeat r initialises every
library with seed --seed + r (the token order stays fixed), so the FVU spread over repeats is the spread
over inits: the noise against which "no worse" is judged.

    python benchmarks/peers.py --activations runs/demo/activations --json runs/bench/peers.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
LIBS = ("saekit", "saelens", "sparsify")
HOOK = "blocks.15.hook_resid_pre"
TIMING_SKIP = 3  # first steps allocate buffers; leave them out of the step-time median


# ----------------------------------------------------------------------------- shared by every worker

def lr_factor(step: int, total: int, warmup: int, decay_fraction: float) -> float:
    """saekit's schedule (linear warm-up, constant, linear decay to 0 over the last fraction)."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    start = (1 - decay_fraction) * total
    return warm * (1.0 if step < start else max(0.0, (total - step) / max(total - start, 1)))


def fvu(a: torch.Tensor, b: torch.Tensor) -> float:
    """Variance about the mean, in float64: the one yardstick for every library (and for the re-imports)."""
    a, b = a.double(), b.double()
    return ((a - b).pow(2).sum() / (a - a.mean(0)).pow(2).sum()).item()


@torch.no_grad()
def quality(encode, forward, x: torch.Tensor, normal: torch.Tensor, d_sae: int, chunk: int = 4096) -> dict[str, float]:
    """FVU (variance about the mean, sums accumulated over all tokens), L0 and dead fraction on x.
    `encode(x) -> (values [n, K], indices [n, K])` and `forward(x) -> x̂` are the library's own."""
    x_hat = torch.cat([forward(x[i: i + chunk]).float() for i in range(0, len(x), chunk)])
    fires = torch.zeros(d_sae, dtype=torch.long)
    active = 0
    for i in range(0, len(x), chunk):
        v, idx = encode(x[i: i + chunk])
        on = v > 0
        active += int(on.sum())
        fires += torch.bincount(idx[on].flatten(), minlength=d_sae)
    return {"fvu": fvu(x[normal], x_hat[normal]), "fvu_with_massive": fvu(x, x_hat), "l0": active / len(x),
            "dead_heldout": (fires == 0).float().mean().item(), "heldout_tokens": len(x)}


# ----------------------------------------------------------------------------- the three training loops

def run_saekit(job: dict, data: dict[str, torch.Tensor], device: torch.device):
    from saekit.config import SaeConfig, TrainConfig
    from saekit.train import Trainer

    train, B, steps = data["train"], job["batch_size"], job["steps"]
    cfg = TrainConfig(saes=[SaeConfig(d_in=train.shape[1], d_sae=job["d_sae"], k=job["k"])], batch_size=B,
                      epochs=steps * B / len(train), lr=job["lr"], warmup_steps=job["warmup_steps"],
                      decay_fraction=job["decay_fraction"], auxk_coef=job["auxk_coef"] if job["auxk"] else 0.0,
                      dead_tokens=job["dead_tokens"], seed=job["seed"], device=str(device), log_every=10**9)
    if job.get("saekit_set"):  # recipe experiments: --saekit-set grad_clip=0
        import dataclasses

        cfg = dataclasses.replace(cfg, **job["saekit_set"])
    trainer = Trainer(cfg, train, tempfile.mkdtemp(prefix="saekit-bench-"), info={"hook": job["hook"]})
    trainer.total_steps = steps  # the schedule's length, exactly
    aux_steps = 0

    def step(batch: torch.Tensor) -> None:
        nonlocal aux_steps
        stats = trainer.train_step(batch)
        trainer.step += 1
        aux_steps += stats[0]["dead_fraction"] > 0 and job["auxk"]

    def finish():
        sae = trainer.trained_sae(0).cpu()  # folded: works on raw activations
        return ((lambda x: sae.encode(x)), sae, 1.0,
                {"dead_train": (trainer.since_fired[0] >= trainer.dead_tokens).float().mean().item(),
                 "aux_steps": aux_steps, "input_scale": trainer.scale}, lambda path: sae.save(path))

    return step, finish


def run_saelens(job: dict, data: dict[str, torch.Tensor], device: torch.device):
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    B, steps, scale = job["batch_size"], job["steps"], job["scale"]
    torch.manual_seed(job["seed"])
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=data["train"].shape[1], d_sae=job["d_sae"], k=job["k"],
                                                device=str(device), dtype="float32",
                                                aux_loss_coefficient=1.0 if job["auxk"] else 0.0))
    window = math.ceil(job["dead_tokens"] / B) if job["auxk"] else 10**9  # its dead window counts steps
    trainer = SAETrainer(
        SAETrainerConfig(total_training_samples=steps * B, train_batch_size_samples=B, lr=job["lr"], lr_end=job["lr"],
                         lr_scheduler_name="constant", lr_warm_up_steps=job["warmup_steps"],
                         lr_decay_steps=int(job["decay_fraction"] * steps), device=str(device),
                         dead_feature_window=window, feature_sampling_window=10**9,
                         logger=LoggingConfig(log_to_wandb=False)),
        sae, data_provider=iter(()))
    aux_steps = 0

    def step(batch: torch.Tensor) -> None:  # SAETrainer.fit's loop body, less logging
        nonlocal aux_steps
        aux_steps += bool(trainer.dead_neurons.any()) and job["auxk"]
        trainer.maybe_reset_sparsity()
        trainer.step(batch * scale)
        trainer._checkpoint_if_needed()
        trainer.n_training_steps += 1

    def finish():
        sae.eval()
        def encode(x):
            acts = sae.encode(x)
            return acts.topk(job["k"], dim=-1)

        def save(path):  # fold the input scale (as SAELens's fold_activation_norm_scaling_factor), inference layout
            sae.fold_activation_norm_scaling_factor(scale)
            sae.cfg.metadata.hook_name = job["hook"]
            sae.save_inference_model(path)

        return encode, sae, scale, {"dead_train": trainer.dead_neurons.float().mean().item(), "aux_steps": aux_steps}, save

    return step, finish


def run_sparsify(job: dict, data: dict[str, torch.Tensor], device: torch.device):
    from sparsify import SparseCoder, SparseCoderConfig

    scale = job["scale"]
    torch.manual_seed(job["seed"])
    sae = SparseCoder(data["train"].shape[1], SparseCoderConfig(num_latents=job["d_sae"], k=job["k"]), device,
                      dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=job["lr"])  # sparsify's "adam" optimizer (no bitsandbytes)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, job["steps"], job["warmup_steps"], job["decay_fraction"]))
    since = torch.zeros(sae.num_latents, dtype=torch.long, device=device)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool, device=device)
    alpha = job["auxk_coef"] if job["auxk"] else 0.0
    state = {"step": 0, "aux_steps": 0}

    def step(batch: torch.Tensor) -> None:  # sparsify.Trainer.fit's hook + step body (loss_fn "fvu")
        x = batch * scale
        if state["step"] == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = since > job["dead_tokens"] if alpha > 0 else None
        state["aux_steps"] += bool(dead_mask is not None and dead_mask.any())
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach())  # its logging reads these every step
        if alpha > 0:
            float(out.auxk_loss.detach())
        (out.fvu + alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        with torch.no_grad():
            since.add_(len(x))
            since[did_fire] = 0
            did_fire.zero_()
        state["step"] += 1

    def finish():
        def save(path):  # sparsify's layout <path>/<hookpoint>/, the input scale folded into the biases
            with torch.no_grad():
                sae.encoder.bias.div_(scale)
                sae.b_dec.div_(scale)
            layer = int(job["hook"].split(".")[1])  # blocks.L.hook_resid_pre is the output of layers.(L-1)
            sae.save_to_disk(Path(path) / f"layers.{layer - 1}")

        def encode(x):
            out = sae.encode(x)
            return out.top_acts, out.top_indices

        return encode, (lambda x: sae(x).sae_out), scale, {
            "dead_train": (since > job["dead_tokens"]).float().mean().item(), "aux_steps": state["aux_steps"]}, save

    return step, finish


RUNNERS = {"saekit": run_saekit, "saelens": run_saelens, "sparsify": run_sparsify}


def unshadow_packages() -> None:
    """Take benchmarks/ off sys.path: its kernels.py would shadow HF's `kernels` package, which transformers
    imports when it finds one by that name."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]


def worker(job_path: str) -> None:
    unshadow_packages()
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    data = load_file(job["data"])
    data = {k: v.to(device) for k, v in data.items()}
    step, finish = RUNNERS[job["lib"]](job, data, device)
    B = job["batch_size"]
    times, cpu_times = [], []
    start = time.perf_counter()
    for i in range(job["steps"]):
        batch = data["train"][i * B: (i + 1) * B]
        t0, c0 = time.perf_counter(), time.process_time()
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)  # all threads: steadier than wall time on a shared CPU
    wall = time.perf_counter() - start
    encode, forward, scale, extra, save = finish()
    held = data["heldout"].cpu() * scale  # FVU, L0 and dead are unchanged by one scalar
    result = {"lib": job["lib"], "repeat": job["repeat"], "steps": job["steps"], "tokens": job["steps"] * B,
              "median_step_s": statistics.median(times[TIMING_SKIP:] or times),
              "tokens_per_s": B / statistics.median(times[TIMING_SKIP:] or times),
              "mean_tokens_per_s": B * len(times) / wall, "step_times": times,
              "tokens_per_cpu_s": B / statistics.median(cpu_times[TIMING_SKIP:] or cpu_times), "cpu_step_times": cpu_times,
              **quality(encode, forward, held, data["heldout_normal"].cpu().bool(), job["d_sae"]), **extra,
              "versions": _versions(job["lib"])}
    if job.get("save_dir"):
        save(job["save_dir"])
    Path(job["result"]).write_text(json.dumps(result))


def _versions(lib: str) -> dict[str, str]:
    from importlib.metadata import version

    out = {"torch": torch.__version__, "python": platform.python_version()}
    dist = {"saekit": "saekit", "saelens": "sae-lens", "sparsify": "eai-sparsify"}[lib]
    out[dist] = version(dist)
    return out


# ----------------------------------------------------------------------------- orchestration

def prepare(args) -> tuple[Path, dict[str, Any]]:
    """Split the cache into training / held-out contexts, drop massive tokens from training, fix the token
    order, and write one file every worker reads."""
    from saekit.cache import ActivationCache
    from saekit.harvest import massive_mask
    from saekit.train import InMemoryBatches, input_scale

    harvest = ActivationCache(args.activations).read(hooks=[args.hook])
    acts, ctx = harvest.acts[args.hook], harvest.context_ids
    contexts = torch.unique(ctx)
    held_ctx = contexts[int(len(contexts) * (1 - args.heldout_fraction)):]  # the last contexts, whole
    held = torch.isin(ctx, held_ctx)
    massive = massive_mask(acts.norm(dim=1), args.massive_multiple)
    train = acts[~held & ~massive]
    steps = int(args.epochs * len(train)) // args.batch_size
    # The order saekit's own Trainer would draw (seeded permutation per epoch), materialised once.
    batches = InMemoryBatches(train, args.batch_size, args.seed)
    ordered = torch.cat([batches.batch(s) for s in range(steps)])
    heldout = acts[held][: args.heldout_tokens]
    normal = ~massive[held][: args.heldout_tokens]
    path = Path(args.workdir) / "data.safetensors"
    save_file({"train": ordered.contiguous(), "heldout": heldout.contiguous(), "heldout_normal": normal.to(torch.uint8)},
              str(path))
    info = {"activations": str(args.activations), "hook": args.hook, "cache_tokens": len(acts),
            "train_tokens_available": len(train), "massive_excluded": int((massive & ~held).sum()), "steps": steps,
            "train_tokens": steps * args.batch_size, "heldout_tokens": len(heldout),
            "heldout_massive": int((~normal).sum()), "scale": input_scale(ordered), "model": harvest.meta.get("model")}
    return path, info


def run_one(lib: str, repeat: int, args, data: Path, info: dict[str, Any]) -> dict[str, Any]:
    from saekit.config import parse_override

    job = {"lib": lib, "repeat": repeat, "data": str(data), "steps": info["steps"], "batch_size": args.batch_size,
           "d_sae": args.d_sae, "k": args.k, "lr": args.lr, "warmup_steps": args.warmup_steps,
           "decay_fraction": args.decay_fraction, "auxk": args.auxk, "auxk_coef": 1 / 32,
           "dead_tokens": info["dead_tokens"], "seed": args.seed + repeat, "scale": info["scale"], "hook": args.hook,
           "threads": args.threads, "device": args.device,
           "save_dir": str(Path(args.save_dir) / f"{lib}-{repeat}") if args.save_dir else None,
           "saekit_set": dict(parse_override(s) for s in args.saekit_set),
           "result": str(Path(args.workdir) / f"{lib}-{repeat}.json")}
    job_path = Path(args.workdir) / f"{lib}-{repeat}.job.json"
    job_path.write_text(json.dumps(job))
    python = sys.executable if lib == "saekit" and not args.saekit_in_peers else args.peers_python
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "SPARSIFY_DISABLE_TRITON": "1",
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    run = subprocess.run([python, str(Path(__file__).resolve()), "--worker", str(job_path)], env=env,
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{lib} worker failed (exit {run.returncode}):\n{run.stderr[-4000:]}")
    result = json.loads(Path(job["result"]).read_text())
    result["process_s"] = time.perf_counter() - t0
    return result


def check_imports(results: list[dict[str, Any]], args, data: Path) -> None:
    """Open every saved SAE (each in its library's own format) with saekit.interop and re-measure its held-out
    FVU on raw activations: it must match what the library itself computed."""
    from saekit.interop import load_any

    held = load_file(str(data))
    x, normal = held["heldout"], held["heldout_normal"].bool()
    for r in results:
        sae = load_any(Path(args.save_dir) / f"{r['lib']}-{r['repeat']}")
        with torch.no_grad():
            x_hat = torch.cat([sae(x[i: i + 4096]) for i in range(0, len(x), 4096)])
        r["fvu_imported"] = fvu(x[normal], x_hat[normal])
        r["imported_hook"] = sae.hook
        print(f"  {r['lib']}-{r['repeat']}: imported into saekit, held-out FVU {r['fvu_imported']:.4f} "
              f"(the library measured {r['fvu']:.4f}), hook {sae.hook}", flush=True)


def summarize(results: list[dict[str, Any]], libs: list[str]) -> dict[str, Any]:
    rows = {}
    for lib in libs:
        rs = [r for r in results if r["lib"] == lib]
        tps = [r["tokens_per_s"] for r in rs]
        cps = [r.get("tokens_per_cpu_s", float("nan")) for r in rs]
        rows[lib] = {"tokens_per_s": statistics.median(tps), "tokens_per_s_min": min(tps), "tokens_per_s_max": max(tps),
                     "tokens_per_cpu_s": statistics.median(cps),
                     **{m: statistics.median(r[m] for r in rs) for m in
                        ("median_step_s", "fvu", "fvu_with_massive", "l0", "dead_heldout", "dead_train", "aux_steps")},
                     "fvu_min": min(r["fvu"] for r in rs), "fvu_max": max(r["fvu"] for r in rs),
                     "repeats": len(rs), "versions": rs[0]["versions"]}
    base = rows.get("saekit", rows[libs[0]])["tokens_per_s"]
    for lib in libs:
        rows[lib]["speed_vs_saekit"] = rows[lib]["tokens_per_s"] / base
        rows[lib]["saekit_speedup"] = base / rows[lib]["tokens_per_s"]
        rows[lib]["saekit_speedup_cpu_time"] = rows.get("saekit", rows[libs[0]])["tokens_per_cpu_s"] / rows[lib]["tokens_per_cpu_s"]
    return rows


def table(rows: dict[str, Any]) -> str:
    head = (f"{'library':<10}{'tok/s (median)':>16}{'min–max':>18}{'saekit ×':>10}{'FVU':>8}{'FVU spread':>16}"
            f"{'FVU+massive':>12}{'L0':>7}{'dead held':>10}{'dead train':>11}{'aux steps':>10}{'saekit × (CPU s)':>18}")
    lines = [head, "-" * len(head)]
    for lib, r in rows.items():
        lines.append(f"{lib:<10}{r['tokens_per_s']:>16,.0f}{r['tokens_per_s_min']:>9,.0f}–{r['tokens_per_s_max']:<8,.0f}"
                     f"{r['saekit_speedup']:>10.2f}{r['fvu']:>8.3f}{r['fvu_min']:>8.3f}–{r['fvu_max']:<7.3f}"
                     f"{r['fvu_with_massive']:>12.3f}{r['l0']:>7.1f}{r['dead_heldout']:>10.1%}{r['dead_train']:>11.1%}"
                     f"{r['aux_steps']:>10.0f}{r['saekit_speedup_cpu_time']:>18.2f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--activations", default=str(ROOT / "runs" / "demo" / "activations"),
                   help="saekit activation cache (saekit harvest --out DIR); default runs/demo/activations")
    p.add_argument("--hook", default=HOOK)
    p.add_argument("--libs", default=",".join(LIBS), help="comma list of saekit, saelens, sparsify")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per library (A B C A B C …)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="default saekit's: 8 × 2e-4·sqrt(2^14/d_sae)")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--decay-fraction", type=float, default=0.2)
    p.add_argument("--auxk", action=argparse.BooleanOptionalAction, default=True, help="AuxK on (default) or off")
    p.add_argument("--dead-tokens", type=int, default=None, help="dead after this many tokens unfired, for "
                                                                  "every library; default training tokens/10")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="last fraction of contexts held out")
    p.add_argument("--heldout-tokens", type=int, default=32768)
    p.add_argument("--massive-multiple", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0, help="token order; repeat r inits with seed + r")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--peers-python", default=str(ROOT / ".venv-peers" / "bin" / "python"))
    p.add_argument("--saekit-in-peers", action="store_true", help="run saekit's worker with the peers' python too")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--save-dir", help="keep each run's trained SAE here in its library's own format "
                                      "(DIR/<lib>-<repeat>; peers' inputs were scaled by data.scale)")
    p.add_argument("--saekit-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a saekit TrainConfig field for saekit's runs (recipe experiments; repeatable)")
    p.add_argument("--json", help="write the table and every run here")
    args = p.parse_args()
    if args.worker:
        worker(args.worker)
        return

    from saekit.sae import lr_rule

    libs = [x for x in args.libs.split(",") if x]
    if any(lib != "saekit" for lib in libs) and not Path(args.peers_python).is_file():
        raise SystemExit(f"no peers python at {args.peers_python}: run `make peers` (a venv with sae-lens and "
                         "eai-sparsify) or pass --peers-python.")
    if not Path(args.activations).is_dir():
        raise SystemExit(f"no activation cache at {args.activations}: run `saekit harvest --tokens 300000 --out DIR` "
                         "and pass --activations DIR.")
    args.lr = args.lr or 8 * lr_rule(args.d_sae)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="saekit-peers-")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    data, info = prepare(args)
    info["dead_tokens"] = args.dead_tokens or max(args.batch_size, min(10_000_000, info["train_tokens"] // 10))
    print(f"{info['train_tokens']:,} training tokens ({info['steps']} steps of {args.batch_size}), "
          f"{info['heldout_tokens']:,} held-out tokens ({info['heldout_massive']} massive), lr {args.lr:.3g}, "
          f"AuxK {'on' if args.auxk else 'off'}, dead after {info['dead_tokens']:,} tokens, {args.threads} threads",
          flush=True)
    results = []
    for rep in range(args.repeats):
        for lib in libs:
            r = run_one(lib, rep, args, data, info)
            results.append(r)
            print(f"  run {rep + 1}/{args.repeats} {lib:<9} {r['tokens_per_s']:>8,.0f} tok/s  fvu {r['fvu']:.3f}  "
                  f"L0 {r['l0']:.1f}  dead {r['dead_heldout']:.1%}  ({r['process_s']:.0f} s)", flush=True)
    if args.save_dir:
        check_imports(results, args, data)
    rows = summarize(results, libs)
    print()
    print(table(rows))
    print(f"\nsaekit × = saekit tokens/s ÷ the library's (medians over {args.repeats} interleaved runs; each run's "
          f"step time is its median over steps {TIMING_SKIP}+); '(CPU s)' compares process CPU time per step instead "
          f"of wall time (steadier when others share the CPU). FVU on held-out normal tokens; dead held = fired "
          f"on none of {info['heldout_tokens']:,} held-out tokens; dead train = the library's own counter.")
    if args.json:
        out = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": _machine(), "command": " ".join(sys.argv),
               "config": {k: v for k, v in vars(args).items() if k not in ("worker",)}, "data": info,
               "table": rows, "runs": [{k: v for k, v in r.items() if k != "step_times"} | {"step_times": r["step_times"]}
                                       for r in results]}
        from saekit.files import write_json

        write_json(args.json, out)
        print(f"wrote {args.json}")


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


if __name__ == "__main__":
    main()
