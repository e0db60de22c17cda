"""Candidates for `saekit steer-eval --flow`: residual features of one SAE of a flow store that have a flow path (a
residual predecessor above the threshold) and fire on 0.2–5% of the set's cached tokens, with their most frequent
top-activating tokens, most concentrated first — a topical feature shows one word family (awards, Parliament, …).

    python benchmarks/flow_candidates.py runs/flow-40k/flow blocks.16.hook_resid_pre [--tokens 40000] [--min-cos 0.5]
"""

from __future__ import annotations

import argparse
import collections

import torch


def main() -> None:
    from transformers import AutoTokenizer

    from saekit.cache import ActivationCache
    from saekit.errors import SaekitError
    from saekit.flow import FlowStore
    from saekit.flow_steer import flow_path
    from saekit.lm import resolve
    from saekit.sae import load_sae
    from saekit.steer_eval import feature_codes

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("flow")
    ap.add_argument("hook")
    ap.add_argument("--tokens", type=int, default=40_000)
    ap.add_argument("--min-cos", type=float, help="default: the flow's threshold")
    ap.add_argument("--top", type=int, default=15, help="top-activating tokens counted per feature")
    a = ap.parse_args()
    flow = FlowStore(a.flow)
    sae = load_sae(flow.set.by_hook(a.hook).path)
    if not sae.info.get("activations"):
        raise SaekitError(f"{a.hook}'s SAE records no activation cache to read tokens from.")
    cache = ActivationCache(sae.info["activations"])
    x = cache.head(a.hook, a.tokens)
    token_ids = _token_ids(cache, len(x))
    tok = AutoTokenizer.from_pretrained(str(resolve(sae.info.get("model_arg") or "default")[0]))
    v, i = feature_codes(sae, x)
    fires = torch.bincount(i[v > 0], minlength=sae.cfg.d_sae).float() / len(x)
    lengths: collections.Counter[int] = collections.Counter()
    rows = []
    for f in ((fires >= 0.002) & (fires <= 0.05)).nonzero()[:, 0].tolist():
        path = flow_path(flow, a.hook, f, 3, a.min_cos)
        lengths[len(path)] += 1
        if len(path) < 2:
            continue
        top = (v * (i == f)).sum(1).topk(a.top).indices
        words = collections.Counter(tok.decode([int(token_ids[t])]).strip() for t in top).most_common(6)
        cos = ", ".join(f"{s.cos:.2f}" for s in path[1:])
        rows.append((f, len(path), cos, float(fires[f]), words))
    print(f"path lengths (layers) among features firing on 0.2–5% of {len(x):,} tokens: {dict(sorted(lengths.items()))}")
    rows.sort(key=lambda r: (-r[4][0][1], len(r[4])))
    for f, n, cos, fr, words in rows:
        print(f"{f:>6}  path {n} (cos {cos})  fires {fr:.2%}  " + " ".join(f"{w!r}×{c}" for w, c in words))


def _token_ids(cache, n: int) -> torch.Tensor:
    """The cached token ids, read from the shards in order (the cache stores them beside each hook's rows)."""
    from safetensors.torch import load_file

    out, have = [], 0
    for shard in sorted(cache.dir.glob("shard_*.safetensors")):
        out.append(load_file(shard)["token_ids"])
        have += len(out[-1])
        if have >= n:
            break
    return torch.cat(out)[:n]


if __name__ == "__main__":
    main()
