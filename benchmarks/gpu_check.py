"""One command for the day a GPU is lent: the kernels' tests, full-size correctness, the kernel benchmark and
(where the peers are installed) the peer table, each step timed, in one JSON and one block for RESULTS.md.

    make gpu-check                           # = python3 benchmarks/gpu_check.py (.venv's python if there is one)
    python benchmarks/gpu_check.py --budget 420 --out runs/gpu-check

Needs a python with torch, triton, safetensors, numpy and tqdm (what `import saekit` pulls in), and pytest for the
test step; not transformer-lens, datasets or streamlit, and no `pip install` of saekit: the checkout is put on
the path and kernels/ registered as `saekit.kernels` (pyproject's package-dir mapping, which only an install makes).

With CUDA: the kernels compile for the GPU. Steps: tests/test_kernels.py + tests/test_ops.py on the GPU; the Triton
ops against a float64 reference at d 768, n 32768, k 32 and the demo shape d 576, n 4608, k 32 (16,384 tokens;
forward and backward, AuxK on); benchmarks/kernels.py at both shapes; benchmarks/peers.py if sae-lens and
sparsify import and an activation cache is given. Each step runs in its own process with a time limit, all
within --budget (default 7 min). Without CUDA: interpreter mode (TRITON_INTERPRET=1): the same steps at small
shapes — correctness only, timings meaningless — plus the tests' compile-for-sm_90 check where saekit is installed.
Writes OUT/gpu_check.json and OUT/RESULTS-block.md; exits 1 if any step failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 16384  # per batch on the GPU, for both shapes
ODD = dict(d=37, n=300, k=7, tokens=20)  # interpreter mode's second shape: nothing a power of two
TOL = 1e-4  # relative to the reference's largest magnitude: fp32 accumulation against float64


def use_checkout() -> None:
    """Import saekit from this checkout (ahead of any install), with kernels/ as saekit.kernels."""
    sys.path.insert(0, str(ROOT))
    import saekit

    if Path(saekit.__file__).resolve().parent != ROOT / "saekit":
        raise SystemExit(f"saekit came from {saekit.__file__}, not this checkout {ROOT}")
    spec = importlib.util.spec_from_file_location("saekit.kernels", ROOT / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["saekit.kernels"] = saekit.kernels = module
    spec.loader.exec_module(module)


# ----------------------------------------------------------------------------- full-size correctness (a worker)

def ops_check(shape: dict, device: str) -> list[dict]:
    """Triton ops (SAEKIT_KERNELS=triton) against float64 autograd: topk_preacts, encode_topk with AuxK (forward
    and the gradients of x, W_enc, b_enc, b_dec) and sparse_decode (forward, gradients of values and W_dec).
    The reference recomputes the kernel's own selection, so near-ties cannot fail it; the selection itself is
    checked by its values: distinct latents whose sorted values equal the reference top-k's."""
    import torch
    import torch.nn.functional as F

    from saekit import ops

    os.environ["SAEKIT_KERNELS"] = "triton"
    N, d, n, k = shape["tokens"], shape["d"], shape["n"], shape["k"]
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    x, W, b, bd, Wd = rand(N, d), rand(d, n) / d**0.5, rand(n) * 0.1, rand(d) * 0.1, rand(n, d) / d**0.5
    dead = (torch.rand(n, generator=gen) < 0.1).to(device)
    k_aux = min(d // 2, int(dead.sum()))
    rows = []

    def record(op: str, got: torch.Tensor, want: torch.Tensor) -> None:
        err = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        rows.append(dict(op=op, rel_err=err, tol=TOL, ok=err <= TOL))

    def selection(op: str, values, indices, pre, kk) -> None:
        distinct = bool((indices.sort(1).values.diff(dim=1) > 0).all())
        rows.append(dict(op=f"{op} distinct latents", rel_err=None, tol=None, ok=distinct))
        record(f"{op} values = pre[indices]", values, pre.gather(1, indices))
        record(f"{op} = reference top-k", values.sort(1).values, pre.topk(kk, dim=1).values.sort(1).values)

    p64 = [t.double().requires_grad_() for t in (x, W, b, bd)]
    pre = (p64[0] - p64[3]) @ p64[1] + p64[2]
    with torch.no_grad():
        v, i = ops.topk_preacts(x, W, b, bd, k)
    selection("topk_preacts", v, i, pre.detach(), k)

    params = [t.clone().requires_grad_() for t in (x, W, b, bd)]
    v, i, av, ai = ops.encode_topk(*params, k, dead, k_aux)
    assert ops.backend() == "triton", ops.backend()
    selection("encode_topk", v, i, pre.detach().relu(), k)
    selection("encode_topk aux", av, ai, pre.detach().masked_fill(~dead, float("-inf")).relu(), k_aux)
    rows.append(dict(op="encode_topk aux latents are dead", rel_err=None, tol=None, ok=bool(dead[ai].all())))
    r1, r2 = rand(N, k), rand(N, k_aux)
    grads = torch.autograd.grad((v * r1).sum() + (av * r2).sum(), params)
    ref = (pre.gather(1, i).relu() * r1.double()).sum() + (pre.gather(1, ai).relu() * r2.double()).sum()
    for name, got, want in zip(("x", "W_enc", "b_enc", "b_dec"), grads, torch.autograd.grad(ref, p64)):
        record(f"encode_topk grad {name}", got, want)
    del pre, p64

    values, W_dec = v.detach().requires_grad_(), Wd.clone().requires_grad_()
    g = rand(N, d)
    out = ops.sparse_decode(values, i, W_dec, bd)
    got = torch.autograd.grad(out, (values, W_dec), g)
    v64, W64 = values.detach().double().requires_grad_(), Wd.double().requires_grad_()
    ref = F.embedding_bag(i, W64, per_sample_weights=v64, mode="sum") + bd.double()
    record("sparse_decode", out, ref.detach())
    for name, a, want in zip(("values", "W_dec"), got, torch.autograd.grad(ref, (v64, W64), g.double())):
        record(f"sparse_decode grad {name}", a, want)
    return rows


def worker(argv: list[str]) -> None:
    """`--exec pytest ARGS`, `--exec ops-check SHAPE_JSON OUT_JSON` or `--exec SCRIPT ARGS`, with the checkout's saekit."""
    use_checkout()
    if argv[0] == "pytest":
        import pytest

        sys.exit(pytest.main(argv[1:]))
    if argv[0] == "ops-check":
        import torch

        rows = ops_check(json.loads(argv[1]), "cuda" if torch.cuda.is_available() else "cpu")
        Path(argv[2]).write_text(json.dumps(rows))
        for r in rows:
            err = "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
            print(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['op']:38s} {err}", flush=True)
        sys.exit(0 if all(r["ok"] for r in rows) else 1)
    import runpy

    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


# ----------------------------------------------------------------------------- the steps

@dataclass
class Step:
    name: str
    status: str = "skipped"  # ok / failed / skipped
    seconds: float = 0.0
    note: str = ""
    tail: str = ""  # the last line the step printed
    result: object = None


@dataclass
class Check:
    out: Path
    budget: float
    cuda: bool
    started: float = field(default_factory=time.perf_counter)
    steps: list[Step] = field(default_factory=list)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)

    def skip(self, name: str, why: str) -> Step:
        print(f"\n== {name}: skipped ({why})", flush=True)
        self.steps.append(step := Step(name, note=why))
        return step

    def run(self, name: str, argv: list[str], cap: float, env: dict | None = None) -> Step:
        """Run `gpu_check.py --exec ARGV` in its own process, echoing its output, killed after min(cap, budget left)."""
        limit = min(cap, self.left())
        if limit < 10:
            return self.skip(name, f"time budget of {self.budget:.0f} s spent")
        print(f"\n== {name} (limit {limit:.0f} s)", flush=True)
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--exec", *argv], cwd=ROOT,
                                env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        killed = []  # the step's whole process group: peers.py's workers, the tests' compile check
        timer = threading.Timer(limit, lambda: killed.append(os.killpg(proc.pid, signal.SIGKILL)))
        timer.start()
        tail = ""
        for line in proc.stdout:
            print("  " + line, end="", flush=True)
            tail = line.strip() or tail
        rc = proc.wait()
        timer.cancel()
        note = f"killed after {limit:.0f} s" if killed else f"exit {rc}" if rc else ""
        step = Step(name, "ok" if rc == 0 else "failed", time.perf_counter() - t, note, tail)
        print(f"== {name}: {step.status} in {step.seconds:.1f} s {note}", flush=True)
        self.steps.append(step)
        return step


INSTALL = "needs this checkout installed (pip install --no-deps --no-build-isolation -e .)"


def installed_here() -> bool:
    """Does a plain python here (no use_checkout) import this checkout's saekit.kernels? The processes that a
    step starts by itself (the tests' compile check, peers.py's workers) need that."""
    out = subprocess.run([sys.executable, "-c", "import saekit.kernels as k; print(k.__file__)"], cwd=ROOT,
                         capture_output=True, text=True)
    return out.returncode == 0 and Path(out.stdout.strip()).resolve().is_relative_to(ROOT)


def peers_step(check: Check, args) -> Step | None:
    name = "peer table (benchmarks/peers.py)"
    if not check.cuda:
        return check.skip(name, "interpreter mode: the GPU peer table needs CUDA (the CPU one: make bench-peers)")
    missing = [m for m in ("sae_lens", "sparsify") if importlib.util.find_spec(m) is None]
    if missing:
        return check.skip(name, f"peers not installed ({', '.join(missing)} missing: pip install sae-lens eai-sparsify)")
    if not args.activations or not Path(args.activations).is_dir():
        return check.skip(name, "no activation cache: peers.py trains on a harvested cache (it has no synthetic-"
                                "activation mode, and this host has no model); copy one and pass --activations DIR")
    if not installed_here():
        return check.skip(name, f"peers.py's worker processes import saekit by themselves: {INSTALL}")
    out = check.out / "peers.json"
    step = check.run(name, ["benchmarks/peers.py", "--device", "cuda", "--peers-python", sys.executable,
                            "--activations", str(Path(args.activations).resolve()), "--repeats", "1", "--json", str(out)], check.left())
    if step.status == "ok":
        step.result = json.loads(out.read_text())["table"]


def versions() -> dict:
    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for dist in ("triton", "pytest", "safetensors", "numpy", "tqdm", "sae-lens", "eai-sparsify"):
        try:
            v[dist] = version(dist)
        except PackageNotFoundError:
            v[dist] = None
    try:
        git = ["git", "-C", str(ROOT)]
        rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        v["saekit_commit"] = (rev + (" (+ uncommitted changes)" if dirty else "")) or None
    except OSError:
        v["saekit_commit"] = None
    return v


# ----------------------------------------------------------------------------- the report

def markdown(report: dict) -> str:
    env, v, steps, interp = report["env"], report["versions"], report["steps"], not report["cuda"]
    lines = [f"## gpu_check.py — {env['device']}{', interpreter mode' if interp else ''} ({report['date'][:10]})", "",
             f"- **Mode**: {report['mode']}",
             f"- **Machine**: {env['device']}; {env['cpu']}, {env['cores']} cores",
             f"- **Versions**: torch {v['torch']}, CUDA {v['cuda'] or 'none'}, triton {v['triton']}, Python {v['python']}; "
             f"saekit at {v['saekit_commit'] or 'unknown commit'}; sae-lens {v['sae-lens'] or 'not installed'}, "
             f"eai-sparsify {v['eai-sparsify'] or 'not installed'}",
             f"- **Command**: `{report['command']}` ({report['seconds']:.0f} s, budget {report['budget_s']:.0f} s)", "",
             "| step | status | s | note |", "|---|---|---:|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['note']} |" for s in steps]
    checks = [s for s in steps if s["name"].startswith("correctness") and s["result"]]
    if checks:  # one row per check, one column per shape
        lines += ["", "**Correctness**: the Triton ops against float64 autograd, max |Δ| / max |reference| "
                  f"(tolerance {TOL:g}); a selection is checked by its values", "",
                  "| check | " + " | ".join(s["name"].removeprefix("correctness ") for s in checks) + " |",
                  "|---|" + "---:|" * len(checks)]
        for i, r in enumerate(checks[0]["result"]):
            cells = [c["result"][i] if i < len(c["result"]) else None for c in checks]
            lines.append(f"| {r['op']} | " + " | ".join(
                "?" if c is None else ("" if c["ok"] else "**FAIL** ") + ("ok" if c["rel_err"] is None else
                                                                          f"{c['rel_err']:.1e}") for c in cells) + " |")
    for s in steps:
        if s["name"].startswith("benchmark") and s["result"]:
            e = s["result"]["env"]
            lines += ["", f"**Benchmark** (benchmarks/kernels.py) {s['name'].removeprefix('benchmark ')}; AuxK "
                      f"{e['dead_fraction']:.0%} dead, k_aux {e['k_aux']}; measured peaks {e['peak_gflops']:.0f} GFLOP/s, "
                      f"{e['peak_gbytes_per_s']:.0f} GB/s" + ("; **interpreter: timings meaningless**" if interp else ""),
                      "", "| op | method | ms | tokens/s | of ceiling | vs dense | Δgrad |",
                      "|---|---|---:|---:|---:|---:|---:|"]
            lines += [f"| {r['op']} | {r['method']} | {r['ms']:.2f} | {r['tokens_per_s']:,.0f} | "
                      f"{r['ceiling_fraction']:.1%} | {r['speedup_vs_dense']:.2f}× | "
                      f"{'' if r['grad_rel_diff'] is None else format(r['grad_rel_diff'], '.1e')} |"
                      for r in s["result"]["rows"]]
        if s["name"].startswith("peer") and s["result"]:
            lines += ["", "**Peers** (benchmarks/peers.py, one repeat)", "",
                      "| library | tokens/s | saekit × | FVU | L0 |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {lib} | {r['tokens_per_s']:,.0f} | {r['saekit_speedup']:.2f} | {r['fvu']:.3f} | {r['l0']:.1f} |"
                      for lib, r in s["result"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    ap.add_argument("--budget", type=float, default=420, help="seconds for all steps together (default 420)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per benchmark row (CUDA)")
    ap.add_argument("--activations", help="a saekit activation cache for the peer table (saekit harvest --out DIR)")
    ap.add_argument("--exec", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.exec:
        return worker(args.exec)

    import torch

    cuda = torch.cuda.is_available()
    mode = ("CUDA: kernels compiled for the GPU" if cuda else
            "interpreter mode (no CUDA): correctness only, timings meaningless")
    v = versions()
    device = torch.cuda.get_device_name() if cuda else "no CUDA device"
    print(f"gpu_check: {mode}\n  {device}; torch {v['torch']} (CUDA {v['cuda']}), triton {v['triton']}, "
          f"python {v['python']} at {sys.executable}\n  needs: torch, triton, safetensors, numpy, tqdm; pytest for the "
          "tests; sae-lens, eai-sparsify and an activation cache for the peer table", flush=True)
    missing = [m for m in ("triton", "safetensors", "numpy", "tqdm") if v[m] is None]
    if missing:
        raise SystemExit(f"gpu_check: missing {', '.join(missing)} in {sys.executable} (pip install {' '.join(missing)})")
    use_checkout()  # the orchestrator never imports triton: each step's process does, after TRITON_INTERPRET is set
    SHAPES = _bench_module().SHAPES
    env = {} if cuda else {"TRITON_INTERPRET": "1"}
    args.out = args.out.resolve()
    check = Check(args.out, args.budget, cuda)
    args.out.mkdir(parents=True, exist_ok=True)

    if v["pytest"] is None:
        check.skip("kernel tests", "pytest is not installed (pip install pytest)")
    else:
        tests = ["pytest", "-q", "--tb=short", "-p", "no:cacheprovider", "tests/test_kernels.py", "tests/test_ops.py"]
        compile_check = not cuda and installed_here()  # on CUDA the tests compile for the GPU itself
        step = check.run("kernel tests (tests/test_kernels.py, tests/test_ops.py"
                         + (", on the GPU)" if cuda else ", interpreter" + (" + compile for sm_90)" if compile_check
                                                                            else ")")), tests, 240,
                         {**env, **({"SAEKIT_COMPILE_CHECK": "1"} if compile_check else {})})
        step.note = step.note or step.tail.strip("= ")
        if not cuda and not compile_check:
            step.note += f"; compile-for-sm_90 check left out: its process {INSTALL}"

    # benchmarks/kernels.py's shapes: on CUDA "gpu" (d 768, n 32768, k 32) and "cpu", the demo's (d 576, n 4608, k 32)
    shapes = ({"gpu": {**SHAPES["gpu"], "tokens": TOKENS}, "cpu": {**SHAPES["cpu"], "tokens": TOKENS}} if cuda else
              {"tiny": SHAPES["tiny"], "odd": ODD})
    label = lambda s: f"d {s['d']}, n {s['n']}, k {s['k']}, {s['tokens']} tokens"  # noqa: E731
    for name, shape in shapes.items():
        path = args.out / f"ops-check-{name}.json"
        step = check.run(f"correctness {label(shape)}", ["ops-check", json.dumps(shape), str(path)], 120, env)
        if path.is_file():
            step.result = json.loads(path.read_text())
            step.note = step.note or f"{sum(r['ok'] for r in step.result)}/{len(step.result)} checks ok"

    for name, shape in shapes.items():
        if name == "odd":
            continue
        path = args.out / f"kernels-{name}.json"
        bench = ["benchmarks/kernels.py", "--shape", name, "--tokens", str(shape["tokens"]), "--methods",
                 "dense,torch,triton", "--repeats", str(args.repeats if cuda else 2), "--json", str(path)]
        step = check.run(f"benchmark {label(shape)}", bench, 150, env)
        if step.status == "ok":
            step.result = json.loads(path.read_text())

    peers_step(check, args)

    report = {"mode": mode, "cuda": cuda, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "budget_s": args.budget, "seconds": time.perf_counter() - check.started, "versions": v,
              "env": {"device": device, "cpu": _cpu(), "cores": os.cpu_count()},
              "steps": [asdict(s) for s in check.steps]}
    from saekit.files import write_json

    write_json(args.out / "gpu_check.json", report)
    block = markdown(report)
    (args.out / "RESULTS-block.md").write_text(block)
    failed = [s.name for s in check.steps if s.status == "failed"]
    skipped = [f"{s.name}: {s.note}" for s in check.steps if s.status == "skipped"]
    print("\n" + block + f"\nwrote {args.out / 'gpu_check.json'} and {args.out / 'RESULTS-block.md'} "
          "(paste the block into benchmarks/RESULTS.md)")
    print("skipped: " + ("; ".join(skipped) if skipped else "nothing"))
    print(f"FAILED: {', '.join(failed)}" if failed else f"all {len(check.steps) - len(skipped)} steps run passed "
          f"in {report['seconds']:.0f} s ({mode})")
    sys.exit(1 if failed else 0)


def _bench_module():
    """benchmarks/kernels.py as a module (its name would clash with the kernels/ package)."""
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
