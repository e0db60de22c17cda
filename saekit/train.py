"""The Trainer: several TopK-family dictionaries fed from one activation stream.

Per step and dictionary: loss = FVU(y, ŷ) + α·AuxK, where y is the target (x itself for an SAE; the MLP's
output for a transcoder, whose rows arrive as [x | y] side by side) and AuxK reconstructs the residual
e = y − ŷ from the top-k_aux pre-activations of dead latents (no b_dec), normalised by e's variance; it trains
their decoder rows and, for SAEs, their encoder (TrainConfig.auxk_trains). Matryoshka
sums the FVU of every nested prefix's prediction. Decoder rows are unit-norm; the gradient component along each
row is removed before the step. Inputs and targets are each scaled by one scalar so that E‖x‖² = d_in
(E‖y‖² = d_out); the scales are folded into the weights at save.

Checkpoints hold weights, optimizer, schedule, dead-latent counters, RNG and the step, so a resumed
run continues exactly as if never stopped (batches are a pure function of seed and step).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import heap, ops
from .config import SaeConfig, TrainConfig
from .errors import FileFormatError, NonFiniteError, SaekitError, ShapeError
from .files import atomic_write
from .harvest import ShuffleBuffer
from .optim import ScheduleFreeSignSGD
from .sae import Across, SparseAutoencoder, lr_rule
from .version import __version__

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_KEYS = ("step", "scale", "config", "saes", "optimizers", "schedules", "since_fired", "rng", "history")
# What a resumed run must share with its checkpoint (the data it was on, and the state's shapes and meaning)
RESUME_INFO = ("hook", "model", "dataset", "context_size", "harvest_tokens")
RESUME_CONFIG = ("saes", "batch_size", "optimizer", "seed")


def sae_name(cfg: SaeConfig) -> str:
    prefix = {"topk": "k", "batchtopk": "btk", "matryoshka": "mat"}[cfg.architecture]
    kind = ("stc-" if cfg.skip else "tc-") if cfg.transcoder else ""
    return f"{kind}{prefix}{cfg.k}-d{cfg.d_sae}"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class BatchSource(Protocol):
    """Where the Trainer's batches come from: epochs over activations in memory (`InMemoryBatches`), a live
    harvest (`StreamBatches`) or this process's shard of a data-parallel stream (`dist.ShardBatches`)."""

    tokens: int
    """Activations in one epoch (over every process)."""
    max_epochs: float | None
    """Passes the source can make (None: any number)."""

    def head(self, n: int) -> torch.Tensor:
        """The first n rows of the stream (input scale, init sample), the same on every process."""
        ...

    def batch(self, step: int) -> torch.Tensor:
        """This process's rows of step `step`: a pure function of the step, which makes resume exact."""
        ...


def check_activations(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 2:
        raise ShapeError(f"activations must be [tokens, d_in], not {tuple(x.shape)}.")
    if not torch.isfinite(x).all():
        raise NonFiniteError("the training activations hold NaN/inf; re-harvest or check the model.")
    return x


class EpochOrder:
    """The global token order: a new seeded permutation of all `tokens` each epoch, so the rows of step s are
    a pure function of (seed, s) — what makes resume exact, and what every data-parallel rank agrees on."""

    acts: torch.Tensor
    batch_size: int
    seed: int
    tokens: int
    max_epochs: float | None = None

    def __init__(self, acts: torch.Tensor, tokens: int, batch_size: int, seed: int):
        self.acts = check_activations(acts)
        if tokens < batch_size:
            raise SaekitError(f"only {tokens} activations for a batch of {batch_size}; harvest more tokens "
                              "or lower --batch-size.")
        self.tokens, self.batch_size, self.seed = tokens, batch_size, seed
        self.steps_per_epoch = tokens // batch_size
        self._perm: tuple[int, torch.Tensor] | None = None

    def step_indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(self.tokens, generator=gen).to(self.acts.device))
        return self._perm[1][i * self.batch_size: (i + 1) * self.batch_size]


class InMemoryBatches(EpochOrder):
    """Batches drawn without replacement from activations in memory; a new seeded permutation each epoch."""

    def __init__(self, acts: torch.Tensor, batch_size: int, seed: int):
        super().__init__(acts, len(acts), batch_size, seed)

    def head(self, n: int) -> torch.Tensor:
        return self.acts[:n]

    def batch(self, step: int) -> torch.Tensor:
        return self.acts[self.step_indices(step)]


class StreamBatches:
    """Batches from a live harvest mixed by a bounded `ShuffleBuffer`, for token budgets that don't fit in
    memory. `rows()` must replay the same stream each call (the harvest is deterministic), so a resumed
    run replays and skips the batches it already trained on: exact, at the cost of re-running the model."""

    max_epochs = 1.0  # a stream is seen once: cache the harvest to reuse it

    def __init__(self, rows: Callable[[], Iterator[torch.Tensor]], tokens: int, batch_size: int,
                 buffer_tokens: int = 262_144, seed: int = 0):
        self.rows, self.tokens, self.batch_size = rows, tokens, batch_size
        self.buffer_tokens, self.seed = buffer_tokens, seed
        self.steps_per_epoch = tokens // batch_size
        self._stream: Iterator[torch.Tensor] | None = None
        self._next = 0
        self._head: torch.Tensor | None = None

    def head(self, n: int) -> torch.Tensor:
        """The first n rows of the stream (read once: each read re-runs the model)."""
        if self._head is None or len(self._head) < n:
            got, have = [], 0
            for r in self.rows():
                got.append(r)
                have += len(r)
                if have >= n:
                    break
            self._head = check_activations(torch.cat(got))
        return self._head[:n]

    def batch(self, step: int) -> torch.Tensor:
        if self._stream is None or step != self._next:  # first call, or a resume: replay and skip
            self._stream = ShuffleBuffer(self.buffer_tokens, self.seed).stream(self.rows(), self.batch_size)
            for _ in range(step):
                next(self._stream)
            self._next = step
        try:
            out = next(self._stream)
        except StopIteration:
            raise SaekitError(f"the activation stream ended after {step} batches; it holds fewer than the "
                              f"{self.tokens} tokens promised.") from None
        self._next += 1
        return out


def check_widths(saes: list[SaeConfig], width: int) -> tuple[int, bool]:
    """(d_in, whether the rows are transcoder pairs [x | y]) for dictionaries trained together on rows of
    `width`: they must all be SAEs or all transcoders of one shape."""
    kinds = {(c.transcoder, c.d_in, c.out_dim if c.transcoder else 0) for c in saes}
    if len(kinds) > 1:
        raise ShapeError(f"dictionaries trained together share their data: {', '.join(sae_name(c) for c in saes)} "
                         "mix SAEs and transcoders or widths; train them in separate runs.")
    transcoder, d_in, d_out = kinds.pop()
    if d_in + d_out != width:
        what = f"d_in {d_in} + d_out {d_out}" if transcoder else f"d_in {d_in}"
        raise ShapeError(f"{sae_name(saes[0])} has {what} but the activations have width {width}"
                         + (" (a transcoder's rows hold its input and its target side by side)." if transcoder else "."))
    return d_in, transcoder


def input_scale(acts: torch.Tensor) -> float:
    """Scalar s with E‖s·x‖² = d_in (computed on the tokens we train on: massive ones would skew it)."""
    sample = acts[: 65536].float()
    return math.sqrt(acts.shape[1] / sample.pow(2).sum(1).mean().item())


class Trainer:
    """Trains `cfg.saes` together on one BatchSource (a [tokens, d_in] tensor means epochs over it in memory)."""

    across: Across | None = None  # how BatchTopK sees the global batch (None: this process's batch is all of it)

    def __init__(self, cfg: TrainConfig, acts: torch.Tensor | BatchSource, out_dir: str | Path,
                 info: dict[str, Any] | None = None, resume: bool = False):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu":
            heap.keep_freed_blocks()  # each step's freed buffers are reused, not faulted in again
        self.info = dict(info or {})
        self.writer = True  # this process writes metrics and wandb (False on ranks > 0 of a distributed run)
        self.data = self._batches(acts)
        if self.data.max_epochs is not None and cfg.epochs > self.data.max_epochs:
            raise SaekitError("a streamed harvest is seen once: use epochs=1, or cache the harvest to reuse it.")
        head = self.data.head(65536).to(self.device)  # every BatchSource checks its activations
        self.d_in, self.transcoder = check_widths(cfg.saes, head.shape[1])
        x, y = self.split(head)
        self.scale = input_scale(x)
        self.target_scale = input_scale(y) if self.transcoder else self.scale
        self.total_steps = max(1, int(cfg.epochs * self.data.tokens) // cfg.batch_size)
        self.dead_tokens = cfg.dead_tokens or max(cfg.batch_size, min(10_000_000, self.total_steps * cfg.batch_size // 50))
        sample, target = x[:16384] * self.scale, y[:16384] * self.target_scale
        init = cfg.transcoder_init if self.transcoder else "tied"
        self.unit_decoder = cfg.decoder_norm == "unit" or (cfg.decoder_norm == "auto" and not self.transcoder)
        self.auxk_encoder = cfg.auxk_trains == "both" or (cfg.auxk_trains == "auto" and not self.transcoder)
        self.saes = [SparseAutoencoder.initialized(c, sample, seed=cfg.seed + i, device=self.device,
                                                  enc_scale=cfg.enc_init_scale, target=target, init=init)
                     for i, c in enumerate(cfg.saes)]
        self.names = [sae_name(c) for c in cfg.saes]
        if len(set(self.names)) != len(self.names):
            raise SaekitError(f"two SAEs share a shape ({self.names}); give them different k or d_sae.")
        self.optimizers = [self._optimizer(s) for s in self.saes]
        self.schedules = [torch.optim.lr_scheduler.LambdaLR(o, self._lr_factor) for o in self.optimizers]
        self.since_fired = [torch.zeros(c.d_sae, dtype=torch.long, device=self.device) for c in cfg.saes]
        self.step = 0
        self.history: list[dict[str, Any]] = []
        if resume:
            self.load_checkpoint()
        # metrics.jsonl holds exactly the logged history up to the current step (a resumed run drops rows
        # logged after its checkpoint; a fresh run starts a fresh file).
        atomic_write(self.out / "metrics.jsonl",
                     lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in self.history)))

    # ------------------------------------------------------------------ setup
    def _batches(self, acts: torch.Tensor | BatchSource) -> BatchSource:
        """Activations in memory become epochs over them (saekit.dist draws this process's share instead)."""
        if isinstance(acts, torch.Tensor):
            return InMemoryBatches(acts.to(self.device), self.cfg.batch_size, self.cfg.seed)
        return acts

    def lr(self, sae: SparseAutoencoder) -> float:
        if self.cfg.lr is not None:
            return self.cfg.lr
        if self.cfg.optimizer == "signum":
            return 5e-3 * math.sqrt(2**14 / sae.cfg.d_sae) / 4
        return self.cfg.lr_scale * lr_rule(sae.cfg.d_sae)

    def _optimizer(self, sae: SparseAutoencoder) -> torch.optim.Optimizer:
        if self.cfg.optimizer == "adam":
            # One fused pass over each tensor: at d_sae 4608 a CPU step of it took 2.8 ms against torch's default
            # per-op loop's 19 ms (AMD Zen 4, 2 threads); it agrees with that loop to fp32 rounding.
            fused = self.device.type in ("cpu", "cuda")
            return torch.optim.Adam(sae.parameters(), lr=self.lr(sae), betas=(0.9, 0.999), eps=6.25e-10, fused=fused)
        if self.cfg.optimizer == "signum":
            return ScheduleFreeSignSGD(sae.parameters(), lr=self.lr(sae), warmup_steps=self.cfg.warmup_steps)
        raise SaekitError(f"unknown optimizer {self.cfg.optimizer!r}: use 'adam' or 'signum'.")

    def _lr_factor(self, step: int) -> float:
        if self.cfg.optimizer == "signum":
            return 1.0  # schedule-free: warm-up lives inside the optimizer
        warm = min(1.0, (step + 1) / max(self.cfg.warmup_steps, 1))
        decay_start = (1 - self.cfg.decay_fraction) * self.total_steps
        decay = 1.0 if step < decay_start else max(0.0, (self.total_steps - step) / max(self.total_steps - decay_start, 1))
        return warm * decay

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) of rows: a transcoder's rows are [x | y], an SAE's target is its input."""
        return (rows[:, : self.d_in], rows[:, self.d_in:]) if self.transcoder else (rows, rows)

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: torch.Tensor) -> list[dict[str, float]]:
        x, y = self.split(batch.float())
        x = x * self.scale
        y = y * self.target_scale if self.transcoder else x
        n = self._batch_tokens(len(x))
        centered_var = self._total((y - self._mean(y)).pow(2).sum(), "reducing the batch variance")
        out = []
        for sae, opt, sched, since in zip(self.saes, self.optimizers, self.schedules, self.since_fired, strict=True):
            dead = since >= self.dead_tokens
            use_aux = self.cfg.auxk_coef > 0 and bool(dead.any())
            k_aux = self.cfg.k_aux or sae.cfg.d_in // 2
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                values, indices, aux_v, aux_i = sae.encode_train(x, dead if use_aux else None, k_aux, self.across)
                preds = sae.prefix_decodes(values, indices, x)
            # mse_loss: one pass forward and one backward (‖y − ŷ‖² by hand costs four passes over [N, d] backward)
            err_sum = F.mse_loss(preds[-1].float(), y, reduction="sum")
            loss = err_sum / centered_var  # the FVU (in a distributed run, this process's share of it)
            for partial in preds[:-1]:  # Matryoshka: every smaller prefix reconstructs the target too
                loss = loss + F.mse_loss(partial.float(), y, reduction="sum") / centered_var
            aux_num, e_var = torch.zeros((), device=x.device), torch.ones((), device=x.device)
            if aux_v is not None:  # AuxK: dead latents reconstruct the residual
                e = y - preds[-1].detach().float()
                # Detached, only their decoder rows learn from it: fewer dead transcoder latents, more dead SAE
                # latents than letting it reach the encoder (TrainConfig.auxk_trains).
                e_hat = ops.sparse_decode(aux_v if self.auxk_encoder else aux_v.detach(), aux_i, sae.W_dec)
                e_var = self._total((e - self._mean(e)).pow(2).sum(), "reducing the AuxK residual variance")
                e_var = e_var.clamp_min(1e-12)
                aux_num = (e - e_hat.float()).pow(2).sum()
                loss = loss + self.cfg.auxk_coef * aux_num / e_var
            loss.backward()
            fired = torch.zeros_like(dead)
            fired[indices[values > 0]] = True
            stats = torch.stack([err_sum.detach().float(), aux_num.detach().float(), (values > 0).sum().float()])
            fired, (err_sum, aux_num, active) = self._reduce_grads(sae, fired, stats)
            fvu = err_sum / centered_var
            aux = aux_num / e_var
            total = fvu + self.cfg.auxk_coef * aux
            if not torch.isfinite(total):  # before the update: the weights and the last checkpoint stay intact
                opt.zero_grad(set_to_none=True)
                raise NonFiniteError(f"the loss of SAE {sae_name(sae.cfg)} became {total.item()} at step {self.step}; "
                                     "the last checkpoint is intact. Lower --lr or check the activations.")
            if self.unit_decoder:
                sae.remove_parallel_grad()
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if self.unit_decoder:
                sae.normalize_decoder()
            since += n
            since[fired] = 0
            out.append({"fvu": fvu.item(), "auxk": aux.item(), "l0": active.item() / n,
                        "dead_fraction": dead.float().mean().item(), "lr": sched.get_last_lr()[0]})
        return out

    # What a data-parallel trainer (saekit.dist) reduces across processes; one process: nothing.
    def _batch_tokens(self, local: int) -> int:
        return local

    def _mean(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(0)

    def _total(self, t: torch.Tensor, what: str) -> torch.Tensor:
        return t

    def _reduce_grads(self, sae: SparseAutoencoder, fired: torch.Tensor, stats: torch.Tensor):
        """(latents fired anywhere, [error sum, AuxK error sum, active codes]) after gradients are final."""
        return fired, stats

    # ------------------------------------------------------------------ loop
    def fit(self, progress: bool = True, stop_after: int | None = None) -> list[Path]:
        """Train to the end (or until `stop_after` steps, for tests), checkpointing; save the SAEs."""
        cfg = self.cfg
        run = _wandb_run(cfg, self.info) if cfg.wandb and self.writer else None
        end = self.total_steps if stop_after is None else min(self.total_steps, stop_after)
        ckpt_steps = max(1, cfg.checkpoint_every // cfg.batch_size) if cfg.checkpoint_every else 0
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train [{ops.training_path(self.device)}]",
                   unit="step", disable=not progress, dynamic_ncols=True)
        t0, s0 = time.perf_counter(), self.step
        for sae in self.saes:
            sae.train()
        while self.step < end:
            stats = self.train_step(self.data.batch(self.step).to(self.device))
            self.step += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == end:
                tps = (self.step - s0) * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
                row = {"step": self.step, "tokens": self.step * cfg.batch_size, "tokens_per_s": tps,
                       **{f"{n}/{k}": v for n, st in zip(self.names, stats) for k, v in st.items()}}
                self.history.append(row)
                if self.writer:
                    with open(self.out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                if run is not None:
                    run.log(row, step=self.step)
                s = stats[0]
                bar.set_postfix_str(f"{tps:,.0f} tok/s fvu {s['fvu']:.3f} L0 {s['l0']:.0f} dead {s['dead_fraction']:.1%}")
            if ckpt_steps and self.step % ckpt_steps == 0 and self.step < end:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        if self.step < self.total_steps:
            return []
        self.plot()
        if run is not None:
            run.finish()
        self.calibrate_thresholds()  # on every process: a data-parallel head() is a collective
        return self.save_saes()

    # ------------------------------------------------------------------ outputs
    def trained_sae(self, i: int) -> SparseAutoencoder:
        """Dictionary i folded to work on raw activations (schedule-free's averaged weights when signum)."""
        sae = self.saes[i]
        opt = self.optimizers[i]
        if isinstance(opt, ScheduleFreeSignSGD):
            sae = SparseAutoencoder(sae.cfg, device=self.device)
            sae.load_state_dict(self.saes[i].state_dict())
            for p, q in zip(sae.parameters(), self.saes[i].parameters()):
                st = opt.state.get(q, {})
                if "x" in st:
                    p.data.copy_(st["x"])
            if self.unit_decoder:
                sae.normalize_decoder()
        sae.info = dict(self.info)
        return sae.folded(self.scale, self.target_scale if self.transcoder else None)

    @torch.no_grad()
    def calibrate_thresholds(self, batches: int = 16) -> None:
        """Set each BatchTopK/Matryoshka dictionary's inference threshold to its mean batch cutoff (the smallest
        value BatchTopK keeps in a batch) over the stream's first `batches` batches, with the final weights. The
        running average kept during training trails weights that moved: after a short run it left the inference
        L0 at half the k trained for (measured on a layer-6 transcoder, 48 steps: L0 16.7 for k 32)."""
        head = None
        for sae in self.saes:
            if not sae.batch_level:
                continue
            if head is None:
                head = self.data.head(batches * self.cfg.batch_size).to(self.device)
            x = self.split(head.float())[0] * self.scale
            was = sae.training
            sae.eval()  # encode_train leaves the threshold alone in eval mode
            cutoffs = []
            for lo in range(0, len(x) - self.cfg.batch_size + 1, self.cfg.batch_size):
                values = sae.encode_train(x[lo: lo + self.cfg.batch_size])[0]
                if (values > 0).any():
                    cutoffs.append(values[values > 0].min())
            sae.train(was)
            if cutoffs:
                sae.threshold.copy_(torch.stack(cutoffs).mean())

    def save_saes(self) -> list[Path]:
        paths = []
        for i, name in enumerate(self.names):
            manifest = {"training": {"config": asdict(self.cfg), "steps": self.step,
                                     "tokens_seen": self.step * self.cfg.batch_size,
                                     "input_scale": self.scale, "dead_tokens": self.dead_tokens,
                                     **({"target_scale": self.target_scale} if self.transcoder else {}),
                                     "path": ops.training_path(self.device),
                                     # tokens whose bf16 shortlist was not provably complete (picked on fp32 rows)
                                     "selection_recomputed_fraction": ops.recomputed_fraction()},
                        "saekit_version": __version__}
            paths.append(self.trained_sae(i).save(self.out / name, manifest))
        return paths

    def plot(self) -> Path | None:
        if not self.history:
            return None
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        metrics = ["fvu", "l0", "dead_fraction", "auxk"]
        fig = make_subplots(rows=2, cols=2, subplot_titles=metrics)
        tokens = [r["tokens"] for r in self.history]
        for j, m in enumerate(metrics):
            for name in self.names:
                fig.add_trace(go.Scatter(x=tokens, y=[r[f"{name}/{m}"] for r in self.history], name=f"{name} {m}",
                                         mode="lines"), row=j // 2 + 1, col=j % 2 + 1)
        fig.update_xaxes(title_text="training tokens")
        fig.update_layout(title=f"saekit training — {self.info.get('hook', '')}", height=700)
        return atomic_write(self.out / "training.html", lambda p: fig.write_html(str(p), include_plotlyjs="cdn"))

    # ------------------------------------------------------------------ checkpoints
    def _mismatches(self, saved: dict[str, Any], saved_info: dict[str, Any]) -> list[str]:
        """Every setting a resumed run must share with its checkpoint that it does not: 'name: then → now'."""
        now = json.loads(json.dumps(asdict(self.cfg)))
        out = [f"{k}: {saved_info[k]!r} → {self.info.get(k)!r}" for k in RESUME_INFO
               if k in saved_info and saved_info[k] != self.info.get(k)]
        out += [f"{k}: {saved[k]!r} → {now[k]!r}" for k in RESUME_CONFIG if k != "saes" and saved.get(k) != now[k]]
        if len(saved["saes"]) != len(now["saes"]):
            out.append(f"number of SAEs: {len(saved['saes'])} → {len(now['saes'])}")
        out += [f"SAE {i} {k}: {a[k]!r} → {b[k]!r}" for i, (a, b) in enumerate(zip(saved["saes"], now["saes"]))
                for k in b if a.get(k) != b[k]]
        return out

    def save_checkpoint(self) -> Path:
        state = {
            "step": self.step,
            "scale": self.scale,
            "target_scale": self.target_scale,
            "config": json.dumps(asdict(self.cfg)),
            "saes": [s.state_dict() for s in self.saes],
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedules": [s.state_dict() for s in self.schedules],
            "since_fired": self.since_fired,
            "rng": torch.get_rng_state(),
            "history": json.dumps(self.history),
            "info": json.dumps(self.info, default=str),
        }
        return atomic_write(self.out / CHECKPOINT, lambda p: torch.save(state, p))

    def load_checkpoint(self) -> None:
        path = self.out / CHECKPOINT
        if not path.is_file():
            raise SaekitError(f"--resume: no checkpoint at {path}. Start without --resume.")
        try:
            with warnings.catch_warnings():  # torch's advice (weights_only=False) is exactly what saekit never does
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:  # torch raises many types for foreign files; none of its advice applies here
            raise FileFormatError(f"{path} is not a saekit checkpoint (torch cannot read it as tensors and plain "
                                  f"values: {type(e).__name__}; saekit never unpickles other objects). Restore it, "
                                  "or start the run again with --overwrite.") from None
        missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise FileFormatError(f"{path} is not a saekit checkpoint (it lacks {', '.join(missing)}). Restore it, "
                                  "or start the run again with --overwrite.")
        mismatches = self._mismatches(json.loads(state["config"]), json.loads(state.get("info", "{}")))
        if mismatches:
            raise ShapeError(f"--resume: this run differs from the checkpoint in {path}: {'; '.join(mismatches)}. "
                             "Resume with the same hook, data and SAE settings, or use a new --out.")
        for sae, sd in zip(self.saes, state["saes"]):
            if tuple(sd["W_enc"].shape) != tuple(sae.W_enc.shape):
                raise ShapeError(f"--resume: checkpoint W_enc {tuple(sd['W_enc'].shape)} vs {tuple(sae.W_enc.shape)}.")
            sae.load_state_dict(sd)
        for o, sd in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(sd)
        for s, sd in zip(self.schedules, state["schedules"]):
            s.load_state_dict(sd)
        self.since_fired = [t.to(self.device) for t in state["since_fired"]]
        self.step, self.scale = int(state["step"]), float(state["scale"])
        self.target_scale = float(state.get("target_scale", self.scale))
        self.history = json.loads(state["history"])
        torch.set_rng_state(state["rng"].cpu())


def _wandb_run(cfg: TrainConfig, info: dict[str, Any]):
    try:
        import wandb
    except ImportError as e:
        raise SaekitError("--wandb needs the wandb package: pip install wandb") from e
    return wandb.init(project="saekit", config={**asdict(cfg), **info})


