"""The CLI fuzz table of issue 12 ("nothing the user had is ever lost, no input gets a traceback").

Imported by tests/test_fuzz.py (one test per case) and by benchmarks/fuzz_cli.py (a before/after table).

`build_world(tmp_dir)` makes, mostly through `saekit.cli.main` itself (so it works on old and new code alike), a
small world of artifacts under `tmp_dir/world`: a tiny 2-layer Llama (d_model 64, a byte-level BPE tokenizer
trained on the spot), a text dataset, two activation caches (two hooks), a trained SAE run, an interrupted
run, a feature store, and damaged/foreign/odd files to feed the CLI.

`run_case(case, world)` runs `saekit.cli.main(argv)` in this process, snapshots the world before and after
(every file's bytes, every directory) and classifies the outcome:

  data loss  a file that existed before was changed or removed;
  traceback  an exception other than SystemExit escaped main(), or "Traceback" was printed;
  silent     exit 0 on an input that should have been refused (or the command launched a server/subprocess
             on it);
  vague      a non-zero exit whose message names none of the case's `names` (or lacks one of `needs`, or
             contains one of `forbid`), an exit other than 2, or a failed command that left new files or
             directories behind;
  handled    exit 2, the message names the option/file, nothing changed, nothing new left behind, and for
             `early` cases no module forward ran first (for `ok` cases: exit 0 and nothing the user had changed).

After each case the world is put back as it was (new paths removed, changed files restored), and the case's
own scratch folder (`world/cases/<name>`, made by its setup before the snapshot) is deleted, so cases are
independent of their order.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import stat
import subprocess
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VERDICTS = ("handled", "vague", "silent", "traceback", "data loss", "n/a")
ISSUE_CLASSES = ("data-loss", "traceback", "silent-or-misleading", "extra")

HOOK0 = "blocks.0.hook_resid_pre"
HOOK1 = "blocks.1.hook_resid_pre"
D_MODEL = 64
SAE_K, SAE_D = 4, 64
SAE_NAME = f"k{SAE_K}-d{SAE_D}"


# ----------------------------------------------------------------------------- the world

@dataclass
class World:
    root: Path  # everything the cases may touch lives here; snapshots cover all of it
    model: Path  # tiny HF Llama directory
    data: Path  # directory of short .txt documents
    cache: Path  # activation cache of HOOK0
    cache_other: Path  # activation cache of HOOK1 (another hook)
    run: Path  # a finished training run (checkpoint.pt, metrics.jsonl, SAE_NAME/)
    sae: Path  # the SAE directory inside `run`
    other_sae: Path  # an SAE of another size (d_sae 128, k 8) with an eval.json beside it
    interrupted: Path  # a run stopped mid-way: checkpoint.pt + metrics.jsonl, no SAE yet
    store: Path  # feature store of `sae` (built from `cache`)
    damaged_store: Path  # a copy of `store` with features.safetensors truncated
    bad_gguf: Path  # random bytes named .gguf
    pickle_ckpt: Path  # a plain pickle of a dict (to plant as a checkpoint.pt)
    readonly: Path  # a directory with mode 0o555
    regular_file: Path  # a regular file (an --out under it cannot be a directory)
    cfg_txt: Path  # a YAML config file named .txt
    single_txt: Path  # one text file holding several paragraphs
    binary: Path  # random bytes named .txt
    cwd: Path  # commands run with this as the working directory (stray relative writes show up)
    cases: Path  # per-case scratch folders live under here
    is_root: bool = False  # read-only directories are writable to root: those cases don't apply

    def case_dir(self, case: Case) -> Path:
        return C(self, case.name)


WORDS = ("the bank raised rates on thursday markets fell as shares slid analysts said it would act again in march "
         "striker scored twice club won cup final fans coach team played best football season film awards actress "
         "ceremony london critics drama phone firm profits record sales grew europe asia river rain hills quiet "
         "dawn sea city council voted new park school pupils teacher exam results music band album tour").split()


def documents(n: int = 80, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = []
        for _ in range(rng.randint(3, 5)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 12))]
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sentences) + f" Item {i}.")
    return docs


def write_tiny_model(directory: Path, texts: list[str]) -> Path:
    """A 2-layer random Llama (d_model 64) with a tokenizer trained on `texts`, saved as an HF directory."""
    from helpers import tiny_llama

    model, tokenizer = tiny_llama(texts, D_MODEL)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def cli(*argv: Any) -> tuple[int, str]:
    """`saekit argv` in this process: (exit code, stdout + stderr)."""
    from saekit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue()


def _must(result: tuple[int, str], what: str) -> str:
    code, text = result
    if code != 0:
        raise RuntimeError(f"building the fuzz world: {what} exited {code}:\n{text[-3000:]}")
    return text


def _interrupt(cache: Path, out: Path) -> None:
    """A run stopped mid-way through the CLI (a KeyboardInterrupt at step 5, checkpoints every 2 steps), so its
    checkpoint holds whatever the CLI records; falls back to Trainer.fit(stop_after=...) if that leaves none."""
    from saekit import train as train_mod

    original = train_mod.Trainer.train_step

    def train_step(self, batch):
        if self.step >= 5:
            raise KeyboardInterrupt
        return original(self, batch)

    train_mod.Trainer.train_step = train_step
    try:
        code, text = cli("train", "--activations", cache, "--k", SAE_K, "--d-sae", SAE_D, "--batch-size", 256,
                         "--epochs", 2, "--checkpoint-every", 512, "--log-every", 1, "--no-eval", "--out", out)
    finally:
        train_mod.Trainer.train_step = original
    if (out / "checkpoint.pt").is_file() and (out / "metrics.jsonl").is_file():
        return
    # fallback: the Trainer directly
    from saekit.cache import ActivationCache
    from saekit.config import SaeConfig, TrainConfig

    c = ActivationCache(cache)
    acts = c.read([HOOK0]).acts[HOOK0]
    cfg = TrainConfig(saes=[SaeConfig(d_in=acts.shape[1], d_sae=SAE_D, k=SAE_K)], batch_size=256, epochs=2,
                      device="cpu", log_every=1)
    info = {**{k: v for k, v in c.manifest.items() if k in ("model", "model_arg", "dataset", "context_size")},
            "hook": HOOK0, "activations": str(cache)}
    train_mod.Trainer(cfg, acts, out, info=info).fit(progress=False, stop_after=4)
    if not (out / "checkpoint.pt").is_file():
        raise RuntimeError(f"building the fuzz world: no interrupted run in {out} (CLI said {code}: {text[-2000:]})")


def build_world(tmp_dir: str | Path) -> World:
    """Build the world under `tmp_dir/world` (see the module docstring). About 5–10 s on 2 CPU cores."""
    from saekit.config import SaeConfig
    from saekit.sae import SparseAutoencoder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    tmp_dir = Path(tmp_dir)
    root = tmp_dir / "world"
    if root.exists():
        _make_writable(root)
        shutil.rmtree(root)
    root.mkdir(parents=True)
    texts = documents()
    data = root / "data"
    data.mkdir()
    for i, t in enumerate(texts):
        (data / f"doc{i:03d}.txt").write_text(t)
    model = write_tiny_model(root / "tinylm", texts)
    common = ["--model", model, "--dataset", data, "--context-size", 32, "--batch-contexts", 8, "--device", "cpu"]
    cache, cache_other = root / "cache", root / "cache_other"
    _must(cli("harvest", *common, "--hook", HOOK0, "--tokens", 2000, "--out", cache), "harvest")
    _must(cli("harvest", *common, "--hook", HOOK1, "--tokens", 2000, "--out", cache_other), "harvest (other hook)")
    run = root / "run"
    _must(cli("train", "--activations", cache, "--k", SAE_K, "--d-sae", SAE_D, "--batch-size", 256, "--epochs", 1,
              "--no-eval", "--out", run), "train")
    sae = next((p.parent for p in sorted(run.rglob("cfg.json"))), None)
    if sae is None:
        raise RuntimeError(f"building the fuzz world: train wrote no SAE (cfg.json) under {run}")
    interrupted = root / "interrupted"
    _interrupt(cache, interrupted)
    store = root / "store"
    _must(cli("analyze", sae, "--activations", cache, "--out", store, "--tokens", 1000, "--top-n", 4,
              "--sample-size", 8, "--quantile-groups", 3, "--map", "pca", "--device", "cpu"), "analyze")

    other = SparseAutoencoder.initialized(SaeConfig(d_in=D_MODEL, d_sae=2 * SAE_D, k=8), seed=1)
    other.info = {"hook": HOOK0, "model_arg": str(model), "dataset": str(data), "context_size": 32}
    other_sae = Path(other.save(root / "other_sae"))
    (other_sae / "eval.json").write_text(json.dumps({"fvu": 0.5, "sae": str(other_sae)}) + "\n")

    damaged = root / "damaged_store"
    shutil.copytree(store, damaged)
    feats = damaged / "features.safetensors"
    if feats.is_file():
        feats.write_bytes(feats.read_bytes()[: max(16, feats.stat().st_size // 3)])
    rng = random.Random(1)
    bad_gguf = root / "bad.gguf"
    bad_gguf.write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    pickle_ckpt = root / "plain_pickle.pt"
    pickle_ckpt.write_bytes(pickle.dumps({"step": 3, "weights": [1.0, 2.0], "note": "not a saekit checkpoint"}))
    regular = root / "regular_file"
    regular.write_text("just a file\n")
    cfg_txt = root / "cfg.txt"
    cfg_txt.write_text("# a YAML config with a .txt name\ntokens: -5\n")
    single = root / "single.txt"
    single.write_text("\n\n".join(texts[:40]) + "\n")
    binary = root / "binary.txt"
    binary.write_bytes(bytes(rng.randrange(256) for _ in range(20000)))
    for name in ("cwd", "cases"):
        (root / name).mkdir()
    readonly = root / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    return World(root=root, model=model, data=data, cache=cache, cache_other=cache_other, run=run, sae=sae,
                 other_sae=other_sae, interrupted=interrupted, store=store, damaged_store=damaged, bad_gguf=bad_gguf,
                 pickle_ckpt=pickle_ckpt, readonly=readonly, regular_file=regular, cfg_txt=cfg_txt, single_txt=single,
                 binary=binary, cwd=root / "cwd", cases=root / "cases", is_root=hasattr(os, "geteuid") and os.geteuid() == 0)


def _make_writable(root: Path) -> None:
    for d, dirs, _ in os.walk(root):
        for x in dirs:
            p = Path(d) / x
            with contextlib.suppress(OSError):
                p.chmod(p.stat().st_mode | stat.S_IWUSR | stat.S_IXUSR | stat.S_IRUSR)


# ----------------------------------------------------------------------------- cases

Argv = Callable[[World], Sequence[Any]]


@dataclass
class Case:
    name: str
    cls: str  # the issue's class: data-loss / traceback / silent-or-misleading / extra
    argv: Argv
    names: tuple[str, ...] = ()  # at least one must appear (as a whole token) in the message
    needs: tuple[str, ...] = ()  # every one must appear (as a whole token)
    forbid: tuple[str, ...] = ()  # none may appear (plain substring)
    ok: bool = False  # the input is fine: the command must succeed
    setup: Callable[[World, Path], None] | None = None  # prepares files in the case's folder (before the snapshot)
    expect: str = ""  # what the fixed code should do, for the table
    readonly: bool = False  # needs a read-only directory (not applicable as root)
    early: bool = False  # must be refused before any module forward (no model pass, no training step)


def mentions(text: str, name: str) -> bool:
    """`name` appears in `text` as a whole token: not inside a longer word or a longer --flag."""
    return re.search(r"(?<![\w-])" + re.escape(name) + r"(?![\w-])", text) is not None


def flag(name: str) -> tuple[str, str]:
    """('--batch-size', 'batch_size') for 'batch_size'."""
    return "--" + name.replace("_", "-"), name


def _copy(src_attr: str, dest: str) -> Callable[[World, Path], None]:
    def setup(w: World, d: Path) -> None:
        shutil.copytree(getattr(w, src_attr), d / dest)
    return setup


def _setup_interrupted_with_pickle(w: World, d: Path) -> None:
    shutil.copytree(w.run, d / "run")
    shutil.copyfile(w.pickle_ckpt, d / "run" / "checkpoint.pt")


def _write(name: str, text: str) -> Callable[[World, Path], None]:
    def setup(w: World, d: Path) -> None:
        (d / name).write_text(text)
    return setup


def _h(w: World, *extra: Any, hook: str = HOOK0, tokens: Any = 200) -> list[Any]:
    """A harvest of the tiny world, valid unless `extra` says otherwise (later flags win)."""
    return ["harvest", "--model", w.model, "--dataset", w.data, "--hook", hook, "--tokens", tokens,
            "--context-size", 32, "--batch-contexts", 8, "--device", "cpu", *extra]


def _t(w: World, *extra: Any, activations: Any = None) -> list[Any]:
    """A training run on the tiny cache, valid unless `extra` says otherwise."""
    return ["train", "--activations", activations or w.cache, "--k", SAE_K, "--d-sae", SAE_D, "--batch-size", 256,
            "--epochs", 1, "--no-eval", "--device", "cpu", *extra]


def _steer(w: World, *extra: Any) -> list[Any]:
    return ["steer", "--sae", w.sae, "--feature", 0, "--strength", 2, "--prompt", "The bank", "--max-new-tokens", 2,
            "--model", w.model, "--store", "none", *extra]


def _steer_eval(w: World, *extra: Any, out: Path) -> list[Any]:
    return ["steer-eval", "--sae", w.sae, "--model", w.model, "--store", "none", "--features", 0, "--n-prompts", 1,
            "--n-neutral", 1, "--max-new-tokens", 2, "--reference-tokens", 500, "--dom-examples", 4,
            "--activations", w.cache, "--out", out, *extra]


def C(w: World, case_name: str) -> Path:
    """The case's scratch folder (exists once its setup ran)."""
    return w.cases / re.sub(r"[^\w.-]", "_", case_name)


def cases() -> list[Case]:
    R = []
    add = R.append

    # ------------------------------------------------------------------ data loss (the fuzzing report)
    add(Case("analyze-out-onto-cache", "data-loss",
             lambda w: ["analyze", w.sae, "--activations", C(w, "analyze-out-onto-cache") / "cache",
                        "--out", C(w, "analyze-out-onto-cache") / "cache", "--tokens", 500, "--device", "cpu"],
             names=("--out", "cache", "--overwrite"), setup=_copy("cache", "cache"),
             expect="refused: --out is the activation cache"))
    add(Case("train-into-interrupted-run-without-resume", "data-loss",
             lambda w: _t(w, "--epochs", 2, "--out", C(w, "train-into-interrupted-run-without-resume") / "run"),
             names=("--resume", "--overwrite"), setup=_copy("interrupted", "run"),
             expect="refused, naming --resume/--overwrite"))
    add(Case("resume-on-another-hooks-cache", "data-loss",
             lambda w: _t(w, "--epochs", 2, "--resume", "--out", C(w, "resume-on-another-hooks-cache") / "run",
                          activations=w.cache_other),
             names=(HOOK0, HOOK1, "--hook"), setup=_copy("interrupted", "run"),
             expect="refused, naming the hooks"))
    add(Case("convert-onto-existing-sae-of-other-size", "data-loss",
             lambda w: ["convert", w.sae, C(w, "convert-onto-existing-sae-of-other-size") / "other_sae"],
             names=("--overwrite",), setup=_copy("other_sae", "other_sae"),
             expect="refused, naming --overwrite"))
    add(Case("harvest-out-under-a-regular-file", "data-loss",
             lambda w: _h(w, "--out", w.regular_file / "sub"), names=("--out", "regular_file"),
             expect="refused before the model pass, naming the file", early=True))
    add(Case("demo-k0-before-harvest", "data-loss",
             lambda w: ["demo", "--k", 0, "--model", w.model, "--dataset", w.data, "--hook", HOOK0, "--tokens", 2000,
                        "--context-size", 32, "--d-sae", SAE_D, "--batch-size", 256, "--epochs", 1, "--no-eval",
                        "--device", "cpu", "--out", C(w, "demo-k0-before-harvest") / "new"],
             names=("--k", "k"), expect="refused before any harvest, no NEW directory left", early=True))

    # ------------------------------------------------------------------ tracebacks (the fuzzing report)
    add(Case("train-batch-size-0", "traceback",
             lambda w: _t(w, "--batch-size", 0, "--out", C(w, "train-batch-size-0") / "new"),
             names=flag("batch_size")))
    add(Case("harvest-tokens-0", "traceback",
             lambda w: _h(w, "--out", C(w, "harvest-tokens-0") / "new", tokens=0), names=flag("tokens")))
    add(Case("harvest-batch-contexts-0", "traceback",
             lambda w: _h(w, "--batch-contexts", 0, "--out", C(w, "harvest-batch-contexts-0") / "new"),
             names=flag("batch_contexts")))
    add(Case("eval-tokens-negative", "traceback",
             lambda w: ["eval", w.sae, "--eval-tokens", -10, "--model", w.model, "--device", "cpu"],
             names=("--eval-tokens", "eval_tokens"), expect="names --eval-tokens (its config key is eval_tokens)"))
    add(Case("steer-max-new-tokens-negative", "traceback", lambda w: _steer(w, "--max-new-tokens", -3),
             names=flag("max_new_tokens")))
    add(Case("steer-eval-strengths-junk", "traceback",
             lambda w: _steer_eval(w, "--strengths", "2,abc", out=C(w, "steer-eval-strengths-junk") / "new"),
             names=flag("strengths")))
    add(Case("harvest-device-cuda-without-cuda", "traceback",
             lambda w: _h(w, "--device", "cuda", "--out", C(w, "harvest-device-cuda-without-cuda") / "new"),
             names=("--device", "device", "cuda", "CUDA")))
    add(Case("harvest-model-random-bytes-gguf", "traceback",
             lambda w: _h(w, "--model", w.bad_gguf, "--out", C(w, "harvest-model-random-bytes-gguf") / "new"),
             names=("bad.gguf",)))
    add(Case("train-out-read-only", "traceback",
             lambda w: _t(w, "--out", w.readonly / "run"), names=("readonly", "--out"), readonly=True))
    add(Case("convert-out-read-only", "traceback",
             lambda w: ["convert", w.sae, w.readonly / "converted"], names=("readonly", "out_dir", "OUT_DIR"),
             readonly=True))
    add(Case("browse-damaged-store", "traceback", lambda w: ["browse", w.damaged_store, "--port", 8599],
             names=("features.safetensors",), expect="exit 2 naming the file; no server started"))

    # ------------------------------------------------------------------ silent or misleading (the fuzzing report)
    add(Case("harvest-tokens-negative", "silent-or-misleading",
             lambda w: _h(w, "--out", C(w, "harvest-tokens-negative") / "new", tokens=-5), names=flag("tokens")))
    add(Case("train-epochs-0", "silent-or-misleading",
             lambda w: _t(w, "--epochs", 0, "--out", C(w, "train-epochs-0") / "new"), names=flag("epochs")))
    add(Case("train-d-sae-negative", "silent-or-misleading",
             lambda w: _t(w, "--d-sae", -4, "--out", C(w, "train-d-sae-negative") / "new"), names=flag("d_sae"),
             forbid=("k must",), expect="names --d-sae (the old message blamed k: 'k must be between 1 and d_sae')"))
    add(Case("config-unknown-key-learning-rate", "silent-or-misleading",
             lambda w: _t(w, "--config", C(w, "config-unknown-key-learning-rate") / "run.yaml",
                          "--out", C(w, "config-unknown-key-learning-rate") / "new"),
             names=("learning_rate",), needs=("lr",), setup=_write("run.yaml", "learning_rate: 0.5\n"),
             expect="names learning_rate and suggests lr"))
    add(Case("config-typo-batchsize", "silent-or-misleading",
             lambda w: _t(w, "--config", C(w, "config-typo-batchsize") / "run.yaml",
                          "--out", C(w, "config-typo-batchsize") / "new"),
             names=("batchsize",), needs=("batch_size",), setup=_write("run.yaml", "batchsize: 8\n"),
             expect="names batchsize and suggests batch_size"))
    add(Case("config-yaml-named-txt-tokens-negative", "silent-or-misleading",
             lambda w: ["harvest", "--config", w.cfg_txt, "--model", w.model, "--dataset", w.data, "--hook", HOOK0,
                        "--context-size", 32, "--device", "cpu",
                        "--out", C(w, "config-yaml-named-txt-tokens-negative") / "new"],
             names=("tokens", "--tokens"), forbid=("Expecting value", "JSONDecodeError"),
             expect="read as YAML; names tokens, no JSON error"))
    add(Case("config-k-eight", "silent-or-misleading",
             lambda w: ["train", "--config", C(w, "config-k-eight") / "run.yaml", "--activations", w.cache,
                        "--d-sae", SAE_D, "--batch-size", 256, "--epochs", 1, "--no-eval", "--device", "cpu",
                        "--out", C(w, "config-k-eight") / "new"],
             names=("k", "--k"), setup=_write("run.yaml", 'k: "eight"\n')))
    add(Case("harvest-single-text-file", "silent-or-misleading",
             lambda w: _h(w, "--dataset", w.single_txt, "--out", C(w, "harvest-single-text-file") / "new"),
             ok=True, expect="works: one text file is split into documents"))
    add(Case("harvest-binary-file-dataset", "silent-or-misleading",
             lambda w: _h(w, "--dataset", w.binary, "--heldout-fraction", 0,
                          "--out", C(w, "harvest-binary-file-dataset") / "new"),
             names=("binary.txt",)))
    add(Case("steer-temperature-negative", "silent-or-misleading", lambda w: _steer(w, "--temperature", -1),
             names=flag("temperature")))
    add(Case("steer-eval-strengths-0-only", "silent-or-misleading",
             lambda w: _steer_eval(w, "--strengths", "0", out=C(w, "steer-eval-strengths-0-only") / "new"),
             names=flag("strengths"), expect="nothing to sweep: refused"))
    add(Case("resume-from-plain-pickle-checkpoint", "silent-or-misleading",
             lambda w: _t(w, "--resume", "--out", C(w, "resume-from-plain-pickle-checkpoint") / "run"),
             names=("checkpoint.pt",), forbid=("weights_only",), setup=_setup_interrupted_with_pickle,
             expect="names checkpoint.pt, no weights_only jargon"))
    add(Case("train-activations-is-an-sae-dir", "silent-or-misleading",
             lambda w: _t(w, "--out", C(w, "train-activations-is-an-sae-dir") / "new", activations=w.sae),
             names=("SAE",), expect="says it is an SAE directory"))
    add(Case("harvest-tokens-0-leaves-no-folder", "silent-or-misleading",
             lambda w: _h(w, "--out", C(w, "harvest-tokens-0-leaves-no-folder") / "new" / "nested", tokens=0),
             names=flag("tokens"), expect="refused, no NEW (nor its parent) left"))

    # ------------------------------------------------------------------ extras
    add(Case("harvest-heldout-fraction-1.5", "extra",
             lambda w: _h(w, "--heldout-fraction", 1.5, "--out", C(w, "harvest-heldout-fraction-1.5") / "new"),
             names=flag("heldout_fraction")))
    add(Case("harvest-context-size-1", "extra",
             lambda w: _h(w, "--context-size", 1, "--out", C(w, "harvest-context-size-1") / "new"),
             names=flag("context_size")))
    add(Case("train-lr-negative", "extra", lambda w: _t(w, "--lr", -1, "--out", C(w, "train-lr-negative") / "new"),
             names=flag("lr")))
    add(Case("harvest-unknown-hook-layer-99", "extra",
             lambda w: _h(w, "--out", C(w, "harvest-unknown-hook-layer-99") / "new", hook="blocks.99.hook_resid_pre"),
             names=("blocks.99.hook_resid_pre",)))
    add(Case("config-file-missing", "extra",
             lambda w: _h(w, "--config", C(w, "config-file-missing") / "missing.yaml",
                          "--out", C(w, "config-file-missing") / "new"), names=("missing.yaml",)))
    add(Case("config-file-holds-a-list", "extra",
             lambda w: _h(w, "--config", C(w, "config-file-holds-a-list") / "list.yaml",
                          "--out", C(w, "config-file-holds-a-list") / "new"),
             names=("list.yaml",), setup=_write("list.yaml", "- tokens\n- 5\n")))
    add(Case("train-k-above-d-sae", "extra",
             lambda w: _t(w, "--k", 100, "--out", C(w, "train-k-above-d-sae") / "new"),
             names=("--k", "k", "--d-sae", "d_sae")))
    add(Case("train-warmup-steps-negative", "extra",
             lambda w: _t(w, "--warmup-steps", -1, "--out", C(w, "train-warmup-steps-negative") / "new"),
             names=flag("warmup_steps")))
    add(Case("analyze-top-n-0", "extra",
             lambda w: ["analyze", w.sae, "--activations", w.cache, "--tokens", 500, "--top-n", 0, "--device", "cpu",
                        "--out", C(w, "analyze-top-n-0") / "new"], names=flag("top_n")))
    add(Case("steer-feature-negative", "extra", lambda w: _steer(w, "--feature", -1), names=flag("feature")))
    add(Case("steer-feature-out-of-range", "extra", lambda w: _steer(w, "--feature", 10**6),
             names=("--feature", "feature", "1000000")))
    add(Case("eval-nonexistent-dir", "extra",
             lambda w: ["eval", C(w, "eval-nonexistent-dir") / "no_such_sae", "--model", w.model],
             names=("no_such_sae",)))
    add(Case("browse-nonexistent-store", "extra",
             lambda w: ["browse", C(w, "browse-nonexistent-store") / "no_such_store", "--port", 8599],
             names=("no_such_store",)))
    add(Case("analyze-out-onto-the-sae-dir", "extra",
             lambda w: ["analyze", C(w, "analyze-out-onto-the-sae-dir") / "the_sae", "--activations", w.cache,
                        "--tokens", 500, "--device", "cpu", "--out", C(w, "analyze-out-onto-the-sae-dir") / "the_sae"],
             names=("--out", "the_sae", "--overwrite"), setup=_copy("sae", "the_sae"),
             expect="refused: --out is an SAE directory"))
    add(Case("harvest-out-onto-a-feature-store", "extra",
             lambda w: _h(w, "--out", C(w, "harvest-out-onto-a-feature-store") / "victim_store"),
             names=("--out", "victim_store", "--overwrite"), setup=_copy("store", "victim_store"),
             expect="refused: --out holds another kind of artifact", early=True))
    add(Case("harvest-out-onto-an-existing-cache", "extra",
             lambda w: _h(w, "--out", C(w, "harvest-out-onto-an-existing-cache") / "victim_cache"),
             names=("--out", "victim_cache", "--overwrite"), setup=_copy("cache", "victim_cache"),
             expect="refused without --overwrite (a harvest of other settings would replace it)", early=True))
    add(Case("convert-onto-itself", "extra",
             lambda w: ["convert", C(w, "convert-onto-itself") / "the_sae", C(w, "convert-onto-itself") / "the_sae"],
             names=("--overwrite", "the_sae"), setup=_copy("sae", "the_sae")))
    add(Case("train-epochs-nan", "extra", lambda w: _t(w, "--epochs", "nan", "--out", C(w, "train-epochs-nan") / "new"),
             names=flag("epochs")))
    add(Case("harvest-massive-multiple-negative", "extra",
             lambda w: _h(w, "--massive-multiple", -1, "--out", C(w, "harvest-massive-multiple-negative") / "new"),
             names=flag("massive_multiple")))
    add(Case("train-activations-nonexistent", "extra",
             lambda w: _t(w, "--out", C(w, "train-activations-nonexistent") / "new",
                          activations=C(w, "train-activations-nonexistent") / "no_such_cache"),
             names=("no_such_cache",)))
    add(Case("analyze-cache-of-another-hook", "extra",
             lambda w: ["analyze", w.sae, "--activations", w.cache_other, "--tokens", 500, "--device", "cpu",
                        "--out", C(w, "analyze-cache-of-another-hook") / "new"], names=(HOOK0, HOOK1)))
    add(Case("eval-batch-contexts-0", "extra",
             lambda w: ["eval", w.sae, "--eval-batch-contexts", 0, "--eval-tokens", 64, "--model", w.model,
                        "--device", "cpu"], names=("--eval-batch-contexts", "eval_batch_contexts")))
    add(Case("train-eval-tokens-negative", "extra",
             lambda w: _t(w, "--eval", "--eval-tokens", -10, "--out", C(w, "train-eval-tokens-negative") / "new"),
             names=("--eval-tokens", "eval_tokens"),
             expect="names --eval-tokens: `train` also has --tokens, so 'tokens' alone is ambiguous"))
    add(Case("steer-sae-nonexistent", "extra",
             lambda w: ["steer", "--sae", C(w, "steer-sae-nonexistent") / "no_such_sae", "--feature", 0, "--strength", 1,
                        "--model", w.model], names=("no_such_sae",)))
    add(Case("harvest-dataset-empty-dir", "extra",
             lambda w: _h(w, "--dataset", C(w, "harvest-dataset-empty-dir") / "empty",
                          "--out", C(w, "harvest-dataset-empty-dir") / "new"),
             names=("empty",), setup=lambda w, d: (d / "empty").mkdir()))
    add(Case("convert-valid-into-new-dir", "extra",
             lambda w: ["convert", w.sae, C(w, "convert-valid-into-new-dir") / "converted"], ok=True,
             expect="works (a sanity row: the harness accepts good input)"))
    return R


CASES = cases()


# ----------------------------------------------------------------------------- running and classifying

@dataclass
class Snapshot:
    files: dict[str, bytes]
    digests: dict[str, str]
    dirs: set[str]


def snapshot(root: Path) -> Snapshot:
    files, digests, dirs = {}, {}, set()
    for d, _, names in os.walk(root):
        rel = os.path.relpath(d, root)
        if rel != ".":
            dirs.add(rel)
        for n in names:
            p = Path(d) / n
            r = os.path.normpath(os.path.join(rel, n))
            try:
                b = p.read_bytes()
            except OSError:
                b = b""
            files[r] = b
            digests[r] = hashlib.sha256(b).hexdigest()
    return Snapshot(files, digests, dirs)


@dataclass
class Outcome:
    case: str
    cls: str
    verdict: str
    code: int | None = None
    message: str = ""
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    seconds: float = 0.0
    why: str = ""

    def describe(self) -> str:
        parts = [f"{self.case} [{self.cls}] → {self.verdict} (exit {self.code}, {self.seconds:.1f} s): {self.why}"]
        for what in ("changed", "removed", "new"):
            if getattr(self, what):
                parts.append(f"  {what}: {', '.join(getattr(self, what)[:8])}")
        parts.append("  output tail:\n    " + "\n    ".join(self.message.strip().splitlines()[-15:]))
        return "\n".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("case", "cls", "verdict", "code", "changed", "removed", "new",
                                              "seconds", "why")} | {"message": self.message[-2000:]}


@contextlib.contextmanager
def user_warnings(out: io.StringIO):
    """The warnings a user of the command line would see (Python's default filters), written to `out` as
    Python prints them, under pytest (which records warnings itself) and in a script alike."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        try:
            yield
        finally:
            for w in caught:
                out.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno))


class CaseTimeout(BaseException):
    """A case ran past CASE_TIMEOUT_S (raised from SIGALRM, so `except Exception` can't swallow it)."""


CASE_TIMEOUT_S = 120


@contextlib.contextmanager
def time_limit(seconds: int):
    """SIGALRM after `seconds` (main thread on POSIX only; elsewhere no limit)."""
    import signal
    import threading

    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise CaseTimeout(f"the case ran over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class LaunchAttempt(BaseException):
    """Raised in place of exec/subprocess: a command must not start a server or subprocess on bad input
    (and never may, from inside the harness). BaseException so that `except Exception` can't swallow it."""


@contextlib.contextmanager
def no_launch():
    """Replace os.exec*/os.spawn*/subprocess launches with LaunchAttempt while a case runs (`saekit browse`
    execs streamlit, which would replace this process)."""
    def refuse(*a, **k):
        raise LaunchAttempt(f"launch attempted: {a[:2]!r}")

    names_os = [n for n in ("execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
                            "spawnv", "spawnve", "spawnvp", "spawnvpe", "system", "posix_spawn", "posix_spawnp")
                if hasattr(os, n)]
    names_sp = ["Popen", "run", "call", "check_call", "check_output"]
    saved = [(os, n, getattr(os, n)) for n in names_os] + [(subprocess, n, getattr(subprocess, n)) for n in names_sp]
    try:
        for mod, n, _ in saved:
            setattr(mod, n, refuse)
        yield
    finally:
        for mod, n, orig in saved:
            setattr(mod, n, orig)


def _restore(root: Path, before: Snapshot, after: Snapshot) -> None:
    """Put the world back: remove new paths, rewrite changed or removed files."""
    _make_writable(root)
    for r in sorted(set(after.files) - set(before.files)):
        with contextlib.suppress(OSError):
            (root / r).unlink()
    for r in sorted(after.dirs - before.dirs, key=len, reverse=True):
        shutil.rmtree(root / r, ignore_errors=True)
    for r, b in before.files.items():
        if after.digests.get(r) != before.digests[r]:
            p = root / r
            if p.is_dir():
                shutil.rmtree(p)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b)
    ro = root / "readonly"
    if ro.is_dir():
        with contextlib.suppress(OSError):  # a read-only mount is read-only already
            ro.chmod(0o555)


def classify(case: Case, code: int | None, text: str, escaped: BaseException | None, before: Snapshot,
             after: Snapshot, launched: bool) -> tuple[str, str, list[str], list[str], list[str]]:
    changed = sorted(r for r in before.digests if r in after.digests and after.digests[r] != before.digests[r])
    removed = sorted(r for r in before.digests if r not in after.digests)
    removed += sorted(d + "/" for d in before.dirs - after.dirs if not any(r.startswith(d + os.sep) for r in removed))
    new = sorted(set(after.files) - set(before.files)) + sorted(d + "/" for d in after.dirs - before.dirs)
    if changed or removed:
        return "data loss", f"{len(changed)} file(s) changed, {len(removed)} removed", changed, removed, new
    if escaped is not None and not launched:
        return "traceback", f"{type(escaped).__name__} escaped main()", changed, removed, new
    if "Traceback (most recent call last)" in text or "Traceback" in text:
        return "traceback", "a traceback was printed", changed, removed, new
    if case.ok:
        if code == 0:
            return "handled", "succeeded", changed, removed, new
        return "vague", f"a valid input was refused (exit {code})", changed, removed, new
    if launched:
        return "silent", "started a server/subprocess on bad input", changed, removed, new
    if code == 0:
        return "silent", "exit 0 on bad input", changed, removed, new
    problems = []
    if code != 2:
        problems.append(f"exit {code}, not 2")
    if case.names and not any(mentions(text, n) for n in case.names):
        problems.append(f"the message names none of {list(case.names)}")
    missing = [n for n in case.needs if not mentions(text, n)]
    if missing:
        problems.append(f"the message lacks {missing}")
    bad = [n for n in case.forbid if n in text]
    if bad:
        problems.append(f"the message contains {bad}")
    if new:
        problems.append(f"left {len(new)} new path(s) behind")
    if problems:
        return "vague", "; ".join(problems), changed, removed, new
    return "handled", "refused with a clear message", changed, removed, new


def run_case(case: Case, world: World) -> Outcome:
    """Run one case in this process and classify it (see the module docstring); the world is restored after."""
    if case.readonly and world.is_root:
        return Outcome(case.name, case.cls, "n/a", why="running as root: read-only directories are writable")
    from saekit.cli import main

    d = world.case_dir(case)
    if d.exists():
        _make_writable(d)
        shutil.rmtree(d)
    d.mkdir(parents=True)
    if case.setup is not None:
        case.setup(world, d)
    argv = [str(a) for a in case.argv(world)]
    before = snapshot(world.root)
    out = io.StringIO()
    code: int | None = None
    escaped: BaseException | None = None
    launched = timed_out = False
    cwd = os.getcwd()
    forwards = [0]
    import torch

    def count(module, args, output):
        forwards[0] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    start = time.perf_counter()
    try:
        os.chdir(world.cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), no_launch(), \
                time_limit(CASE_TIMEOUT_S), user_warnings(out):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=out)
    except LaunchAttempt as e:
        launched, escaped, code = True, e, 0
    except CaseTimeout as e:
        timed_out, escaped = True, e
    except Exception as e:  # noqa: BLE001 - exactly what the harness measures
        escaped = e
    finally:
        os.chdir(cwd)
        handle.remove()
    seconds = time.perf_counter() - start
    text = out.getvalue()
    after = snapshot(world.root)
    verdict, why, changed, removed, new = classify(case, code, text, escaped, before, after, launched)
    if timed_out and verdict == "traceback":
        verdict, why = "vague", f"no answer within {CASE_TIMEOUT_S} s"
    if case.early and verdict == "handled" and not case.ok and forwards[0]:
        verdict, why = "vague", f"refused only after {forwards[0]} module forward(s): check before the model pass"
    if escaped is not None:
        note = "launch attempted" if launched else "exception escaped main()"
        text += f"\n[harness] {note}:\n" + "".join(traceback.format_exception(escaped))[-4000:]
    _restore(world.root, before, after)
    _make_writable(d)
    shutil.rmtree(d, ignore_errors=True)
    return Outcome(case.name, case.cls, verdict, code, text, changed, removed, new, seconds, why)


def totals(outcomes: list[Outcome]) -> dict[str, int]:
    t = {v: 0 for v in VERDICTS}
    for o in outcomes:
        t[o.verdict] += 1
    return t


def table(outcomes: list[Outcome]) -> str:
    w = max(len(o.case) for o in outcomes)
    lines = [f"{'case':<{w}}  {'issue class':<20}  {'result':<9}  {'exit':>4}  {'s':>5}  why",
             "-" * (w + 60)]
    for o in outcomes:
        lines.append(f"{o.case:<{w}}  {o.cls:<20}  {o.verdict:<9}  {str(o.code):>4}  {o.seconds:5.1f}  {o.why}")
    lines.append("-" * (w + 60))
    for cls in ISSUE_CLASSES:
        group = [o for o in outcomes if o.cls == cls]
        if group:
            lines.append(f"{cls + ':':<21} {summary(group)}")
    lines.append(f"{'all:':<21} {summary(outcomes)}")
    return "\n".join(lines)


def summary(outcomes: list[Outcome]) -> str:
    """handled / vague (silent counted with vague) / traceback / data loss."""
    t = totals(outcomes)
    return (f"handled {t['handled']} / vague {t['vague'] + t['silent']} (silent {t['silent']}) / "
            f"traceback {t['traceback']} / data loss {t['data loss']}"
            + (f"   (n/a {t['n/a']})" if t["n/a"] else "") + f"   of {len(outcomes)} cases")
