"""The `saekit` command end to end on the real model at tiny budgets, its errors (exit 2, no traceback),
its help (drawn from the config docstrings) and config files with flag overrides.

Commands run in-process through `saekit.cli.main` with the session's model and contexts handed to them
(loading them again is the one thing these tests don't need to repeat); one test runs the real entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from helpers import HOOK

from saekit import cli
from saekit.config import HarvestConfig, TrainConfig
from saekit.errors import SaekitError
from saekit.sae import load_sae

REQUIRED = {"fvu", "fvu_excl_massive", "nmse", "l0", "dead_fraction", "dense_fraction", "ce_clean", "ce_sae",
            "ce_zero_ablation", "ce_mean_ablation", "ce_recovered_zero", "ce_recovered_mean", "kl", "tokens"}


@pytest.fixture
def run(model, default_contexts, monkeypatch, capsys):
    """run(*argv) -> (exit code, stdout, stderr) of `saekit argv` with the shared model and contexts."""
    import saekit.data
    import saekit.lm

    load_model, load_contexts = saekit.lm.load_model, saekit.data.load_contexts

    def shared_model(name="default", *a, **kw):
        return model if name == "default" else load_model(name, *a, **kw)

    def shared_contexts(tokenizer, dataset="default", context_size=128, heldout_fraction=0.05, seed=0,
                        text_column="text"):
        if (tokenizer, dataset, context_size, heldout_fraction, seed) == (model.tokenizer, "default", 128, 0.05, 0):
            return default_contexts
        return load_contexts(tokenizer, dataset, context_size, heldout_fraction, seed, text_column)

    monkeypatch.setattr(saekit.lm, "load_model", shared_model)
    monkeypatch.setattr(saekit.data, "load_contexts", shared_contexts)

    def go(*argv):
        capsys.readouterr()
        code = cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return go


def test_train_end_to_end(run, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = run("train", "--tokens", 2048, "--batch-contexts", 6, "--d-sae", 256, "--k", 8, "--epochs", 1,
                               "--batch-size", 256, "--eval-tokens", 512, "--out", out)
    assert code == 0, stderr
    sae_dir = out / "k8-d256"
    for name in ("cfg.json", "sae_weights.safetensors", "eval.json"):
        assert (sae_dir / name).is_file(), name
    for name in ("metrics.jsonl", "training.html", "checkpoint.pt", "activations/manifest.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((sae_dir / "eval.json").read_text())
    assert REQUIRED <= set(metrics)
    assert metrics["tokens"] == 512 and metrics["hook"] == HOOK
    assert metrics["ce_zero_ablation"] > metrics["ce_clean"]
    sae = load_sae(sae_dir)
    assert metrics["weights_sha256"] == sae.weights_hash()
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (576, 256, 8) and sae.hook == HOOK
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == HOOK
    assert cfg["saekit"]["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and cfg["saekit"]["harvest_tokens"] == 2048
    steps = cfg["saekit"]["training"]["steps"]
    assert 1 <= steps <= 8
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["step"] == steps
    assert "CE recovered vs mean" in stdout and "massive tokens of 2048" in stdout

    # --resume of a finished run: the cached activations are reused, nothing retrains
    code, stdout, stderr = run("train", "--tokens", 2048, "--batch-contexts", 6, "--d-sae", 256, "--k", 8, "--epochs", 1,
                               "--batch-size", 256, "--out", out, "--resume", "--no-eval")
    assert code == 0, stderr
    assert "reusing the activations cached" in stdout
    assert load_sae(sae_dir).weights_hash() == sae.weights_hash()


def test_harvest_then_train_from_the_cache_then_eval(run, tmp_path):
    cache = tmp_path / "acts"
    code, stdout, stderr = run("harvest", "--tokens", 1024, "--batch-contexts", 8, "--out", cache)
    assert code == 0, stderr
    man = json.loads((cache / "manifest.json").read_text())
    assert man["tokens"] == 1024 and man["hooks"] == [HOOK] and man["d_in"] == {HOOK: 576}
    assert "harvested 1,024 tokens" in stdout

    out = tmp_path / "run"
    code, stdout, stderr = run("train", "--activations", cache, "--d-sae", 128, "--k", "4,8", "--epochs", 1,
                               "--batch-size", 256, "--no-eval", "--out", out)
    assert code == 0, stderr
    assert "loading model" not in stdout  # no model pass when training from a cache
    for name in ("k4-d128", "k8-d128"):  # a comma list trains one SAE per k, on one stream
        sae = load_sae(out / name)
        assert sae.info["activations"] == str(cache) and sae.info["model"] == man["model"]
        assert not (out / name / "eval.json").exists()

    code, stdout, stderr = run("eval", out / "k4-d128", "--eval-tokens", 256)
    assert code == 0, stderr
    metrics = json.loads((out / "k4-d128" / "eval.json").read_text())
    assert REQUIRED <= set(metrics) and metrics["tokens"] == 256


def test_bad_hook_exits_2_with_close_names(run, tmp_path):
    code, stdout, stderr = run("train", "--hook", "blocks.15.hook_resid_pr", "--tokens", 256, "--out", tmp_path)
    assert code == 2
    assert "saekit: error: unknown hook 'blocks.15.hook_resid_pr'" in stderr
    assert "blocks.15.hook_resid_pre" in stderr and "Traceback" not in stderr + stdout


def test_d_in_mismatch_from_a_cache_on_resume(run, tmp_path):
    """A run resumed on a cache of another width names both sizes."""
    import torch

    from saekit.cache import ActivationCache
    from saekit.harvest import Harvest

    def cache(path, width):
        n = 600
        ActivationCache.write(path, Harvest({HOOK: torch.randn(n, width)}, torch.full((n,), 5), torch.ones(n, dtype=torch.long),
                                                 torch.zeros(n, dtype=torch.long)), {"model": "m", "dataset": "d"})

    cache(tmp_path / "a", 16)
    cache(tmp_path / "b", 24)
    args = ["train", "--d-sae", 32, "--k", 4, "--epochs", 1, "--batch-size", 200, "--no-eval", "--out", tmp_path / "run"]
    assert run(*args, "--activations", tmp_path / "a")[0] == 0
    code, _, stderr = run(*args, "--activations", tmp_path / "b", "--resume")
    assert code == 2 and "SAE 0 d_in: 16 → 24" in stderr and "Traceback" not in stderr


def test_missing_sae_dir_exits_2_from_the_real_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "saekit", "eval", str(tmp_path / "nope")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "saekit: error:" in proc.stderr and "not an SAE directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_is_drawn_from_config_docstrings(capsys):
    from saekit.cli import field_docs

    for command, cls, field in [("train", TrainConfig, "batch_size"), ("train", HarvestConfig, "tokens"),
                                ("harvest", HarvestConfig, "hooks"), ("eval", cli.EvalConfig, "tokens")]:
        with pytest.raises(SystemExit) as e:
            cli.build_parser().parse_args([command, "--help"])
        assert e.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert field_docs(cls)[field] in text, (command, field)
    assert "--eval-tokens" in text and "--resume" not in text  # eval's own options only


def test_each_flag_once_with_its_own_help(capsys):
    """Every flag of every command is registered once (a flag two configs share would be a silent merge) and has
    help text of its own; the run's seed and device are the harvest's flags."""
    parser = cli.build_parser()
    for command in cli.COMMANDS:
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = capsys.readouterr().out
        flags = [w.strip(",") for line in text.splitlines() if line.startswith("  -")
                 for w in line.split() if w.startswith("--") and w != "--help"]
        assert len(flags) == len(set(flags)), (command, sorted(f for f in flags if flags.count(f) > 1))
    spec = cli.train_run(cli.options(parser.parse_args(["train", "--seed", "3", "--device", "cpu"])), "runs/train")
    assert (spec.harvest.seed, spec.harvest.device) == (3, "cpu")


def test_unknown_config_keys_are_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"k": 8, "learning_rate": 1e-3}))
    assert cli.main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "unknown option 'learning_rate'; did you mean lr?" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"batchsize": 8}))
    assert cli.main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "unknown option 'batchsize'; did you mean batch_size" in capsys.readouterr().err


def test_config_file_and_flag_overrides(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text(yaml.safe_dump({"k": 16, "d-sae": 512, "tokens": 1000, "hook": "blocks.3.hook_resid_pre",
                                   "batch_size": 128, "lr_scale": 2.0}))
    spec = cli.train_run(cli.options(cli.build_parser().parse_args(["train", "--config", str(yml), "--k", "8",
                                                                     "--tokens", "2000"])), "runs/train")
    assert [(s.k, s.d_sae) for s in spec.train.saes] == [(8, 512)]  # flag beats file
    hcfg = spec.harvest
    assert isinstance(hcfg, HarvestConfig) and hcfg.tokens == 2000 and hcfg.hooks == ["blocks.3.hook_resid_pre"]
    tcfg = spec.train
    assert isinstance(tcfg, TrainConfig)
    assert tcfg.batch_size == 128 and tcfg.lr_scale == 2.0 and tcfg.epochs == TrainConfig.epochs
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"saes": [{"k": 4, "d_sae": 64}, {"k": 8, "d_sae": 64}], "hook": HOOK}))
    spec = cli.train_run(cli.options(cli.build_parser().parse_args(["train", "--config", str(js), "--hook",
                                                                     "blocks.1.hook_resid_pre"])), "runs/train")
    assert [(s.k, s.d_sae) for s in spec.train.saes] == [(4, 64), (8, 64)]
    assert spec.harvest.hooks == ["blocks.1.hook_resid_pre"]


def test_bad_config_files_exit_2(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("k: [1, 2\n")
    assert cli.main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "bad.yaml: not valid YAML or JSON" in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[1, 2]")
    assert cli.main(["train", "--config", str(tmp_path / "list.json")]) == 2
    assert "must hold a mapping" in capsys.readouterr().err
    with pytest.raises(SaekitError, match=r"--k 'eight': expected a whole number"):
        cli.sae_configs({"k": "eight"})


def test_parse_override():
    from saekit.config import parse_override

    assert parse_override("enc-init-scale=0.5") == ("enc_init_scale", 0.5)
    assert parse_override("exclude_massive=false") == ("exclude_massive", False)
    assert parse_override("optimizer=signum") == ("optimizer", "signum")


def test_a_model_that_cannot_load_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAEKIT_CACHE", str(tmp_path / "cache"))
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    assert cli.main(["harvest", "--model", str(junk), "--tokens", "16", "--out", str(tmp_path / "acts")]) == 2
    err = capsys.readouterr().err
    assert "saekit: error:" in err and str(junk) in err and "Traceback" not in err
