"""Feature-store statistics against brute-force references on small synthetic data, the store format,
token display, labels under concurrency, and the model-pass / cached-harvest equivalence (tiny model)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from helpers import TINY_HOOK as HOOK
from helpers import manifest
from saekit.apps.labels import Conflict, Labels

from saekit.features import (
    BINS_PER_DECADE,
    HIST_BINS,
    HIST_LO,
    FeatureBuilder,
    FeatureConfig,
    FeatureStore,
    Vocab,
    decoder_neighbours,
    hist_edges,
    hist_quantiles,
    logit_effects,
    write_store,
)

N_CTX, T, N, K, V, D = 30, 14, 20, 3, 40, 8


def synthetic(seed: int = 0):
    """Dense activations [ctx, pos, latent] with K active latents per token (position 0 never kept)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (N_CTX, T), generator=g)
    dense = torch.zeros(N_CTX, T, N)
    bias = torch.linspace(-1, 1, N)  # some latents fire much more often than others
    for c in range(N_CTX):
        for p in range(1, T):
            pre = torch.randn(N, generator=g) + bias
            idx = pre.topk(K).indices
            dense[c, p, idx] = torch.rand(K, generator=g) * 10 ** (torch.rand(K, generator=g) * 3 - 1)
    return tokens, dense


def feed(builder: FeatureBuilder, tokens, dense, batch_contexts: int) -> None:
    for lo in range(0, N_CTX, batch_contexts):
        cs = range(lo, min(lo + batch_contexts, N_CTX))
        rows = [(c, p) for c in cs for p in range(1, T)]
        acts = torch.stack([dense[c, p] for c, p in rows])
        values, indices = acts.topk(K, dim=1)
        builder.add(values, indices, torch.tensor([int(tokens[c, p]) for c, p in rows]),
                    torch.tensor([p for _, p in rows]), torch.tensor([c for c, _ in rows]))


CFG = FeatureConfig(top_n=5, sample_size=6, window_before=3, window_after=2, profile_tokens=4, logit_tokens=3,
                    neighbours=4, device="cpu")


@pytest.fixture(scope="module")
def built():
    tokens, dense = synthetic()
    b = FeatureBuilder(N, V, CFG)
    feed(b, tokens, dense, batch_contexts=4)
    g = torch.Generator().manual_seed(1)
    W_dec = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    W_U, w = torch.randn(D, V, generator=g), torch.rand(D, generator=g) + 0.5
    stats, feats, info = b.finish(W_dec, W_U, w)
    return tokens, dense, stats, feats, (W_dec, W_U, w)


def test_counts_sums_max_hist(built):
    tokens, dense, stats, feats, _ = built
    on = dense > 0
    assert torch.equal(stats["count"], on.sum((0, 1)))
    assert torch.allclose(stats["act_sum"], dense.double().sum((0, 1)))
    assert torch.allclose(stats["act_max"], dense.amax((0, 1)))
    assert int(stats["token_count"].sum()) == N_CTX * (T - 1)
    for f in range(N):
        vals = dense[..., f][on[..., f]].numpy()
        bins = np.clip(np.floor((np.log10(vals) - HIST_LO) * BINS_PER_DECADE), 0, HIST_BINS - 1).astype(int)
        assert np.array_equal(feats["hist"][f].numpy(), np.bincount(bins, minlength=HIST_BINS))


def test_top_examples_exact_one_per_context_with_windows(built):
    tokens, dense, stats, feats, _ = built
    W = CFG.window
    for f in range(N):
        per_ctx = dense[..., f].amax(1)  # best activation of each context
        order = per_ctx.argsort(descending=True)
        expect = [int(c) for c in order if per_ctx[c] > 0][: CFG.top_n]
        got_ctx = [int(c) for c in feats["top_ctx"][f] if c >= 0]
        assert got_ctx == expect, f
        assert torch.allclose(feats["top_value"][f][: len(expect)], per_ctx[expect])
        for j, c in enumerate(expect):
            p = int(feats["top_pos"][f, j])
            assert dense[c, p, f] == per_ctx[c]
            want = torch.zeros(W)
            for o in range(W):
                q = p - CFG.window_before + o
                if 0 <= q < T:
                    want[o] = dense[c, q, f]
            assert torch.allclose(feats["top_acts"][f, j].float(), want, rtol=1e-3, atol=1e-3)


def test_sample_entries_are_real_firings_one_per_context(built):
    tokens, dense, stats, feats, _ = built
    for f in range(N):
        ctxs = [int(c) for c in feats["sample_ctx"][f] if c >= 0]
        fired = int((dense[..., f].amax(1) > 0).sum())
        assert len(ctxs) == min(CFG.sample_size, fired) and len(set(ctxs)) == len(ctxs)
        for j, c in enumerate(ctxs):
            p = int(feats["sample_pos"][f, j])
            assert float(feats["sample_value"][f, j]) == pytest.approx(float(dense[c, p, f])) and dense[c, p, f] > 0
        vals = feats["sample_value"][f][: len(ctxs)]
        assert torch.all(vals[:-1] >= vals[1:])  # stored sorted by value


def test_sample_is_uniform_over_firings():
    """One latent firing once in each of 12 contexts: each context must be sampled with chance S/12."""
    n_ctx, S, runs = 12, 3, 300
    hits = np.zeros(n_ctx)
    for seed in range(runs):
        b = FeatureBuilder(2, 5, FeatureConfig(top_n=1, sample_size=S, window_before=0, window_after=0, seed=seed,
                                               device="cpu"))
        for lo in range(0, n_ctx, 4):
            cs = torch.arange(lo, lo + 4)
            b.add(torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                  torch.ones(4, dtype=torch.long), cs)
        for c in b.sample.ctx[0].tolist():
            hits[c] += 1
    expect = runs * S / n_ctx
    assert hits.sum() == runs * S
    assert np.abs(hits - expect).max() < 5 * np.sqrt(expect)


def test_token_profile_is_frequency_normalised(built):
    tokens, dense, stats, feats, _ = built
    tok_count = np.bincount(tokens[:, 1:].reshape(-1).numpy(), minlength=V)
    assert np.array_equal(stats["token_count"].numpy(), tok_count)
    for f in range(N):
        fires = np.zeros(V)
        sums = np.zeros(V)
        for c in range(N_CTX):
            for p in range(1, T):
                if dense[c, p, f] > 0:
                    fires[tokens[c, p]] += 1
                    sums[tokens[c, p]] += float(dense[c, p, f])
        rate, share = fires / (tok_count + CFG.profile_prior), fires / max(fires.sum(), 1)
        score = np.where(fires > 0, 2 * rate * share / np.maximum(rate + share, 1e-30), 0)
        cand = np.nonzero(fires)[0]
        best = np.sort(score[cand])[::-1][: CFG.profile_tokens]
        got = [int(t) for t in feats["profile_token"][f] if t >= 0]
        assert np.allclose(np.sort(score[got])[::-1], best, atol=1e-6)
        for j, t in enumerate(got):
            assert int(feats["profile_fires"][f, j]) == fires[t]
            assert int(feats["profile_token_count"][f, j]) == tok_count[t]
            assert float(feats["profile_mean"][f, j]) == pytest.approx(sums[t] / fires[t], rel=1e-5)


def test_profile_compaction_matches_single_pass():
    tokens, dense = synthetic(3)
    a, b = FeatureBuilder(N, V, CFG), FeatureBuilder(N, V, CFG)
    feed(a, tokens, dense, 5)
    add = b.add

    def add_and_compact(*args):  # compact after every batch, as a long run does every few million pairs
        add(*args)
        b._compact()

    b.add = add_and_compact
    feed(b, tokens, dense, 5)
    assert all(torch.equal(x, y) for x, y in zip(a.profile().values(), b.profile().values()))


def test_batching_does_not_change_exact_statistics():
    tokens, dense = synthetic(5)
    a, b = FeatureBuilder(N, V, CFG), FeatureBuilder(N, V, CFG)
    feed(a, tokens, dense, 3)
    feed(b, tokens, dense, 10)
    assert torch.equal(a.count, b.count) and torch.equal(a.hist, b.hist)
    assert torch.equal(a.top.sorted_by_value()["ctx"], b.top.sorted_by_value()["ctx"])


def test_logit_effects_apply_final_norm(built):
    *_, feats, (W_dec, W_U, w) = built
    logits = (W_dec * w) @ W_U
    top = logits.topk(CFG.logit_tokens, dim=1)
    assert torch.equal(feats["logit_top_token"].long(), top.indices)
    assert torch.allclose(feats["logit_top_value"], top.values, atol=1e-5)
    bottom = logits.topk(CFG.logit_tokens, dim=1, largest=False)
    assert torch.equal(feats["logit_bottom_token"].long(), bottom.indices)
    without = logit_effects(W_dec, W_U, None, CFG.logit_tokens)
    assert not torch.equal(without["logit_top_token"], feats["logit_top_token"])  # the norm weight matters here


def test_neighbours_chunked_match_full_matrix():
    W = torch.randn(50, 6)
    got = decoder_neighbours(W, 5, chunk=7)
    Wn = torch.nn.functional.normalize(W, dim=1)
    cos = Wn @ Wn.t()
    cos.fill_diagonal_(-2)
    top = cos.topk(5, dim=1)
    assert torch.equal(got["neighbour_id"].long(), top.indices)
    assert torch.allclose(got["neighbour_cos"], top.values, atol=1e-6)


def test_hist_quantiles_within_one_bin():
    g = np.random.default_rng(0)
    vals = g.lognormal(0.5, 1.0, 5000)
    edges = hist_edges()
    counts = np.histogram(vals, bins=edges)[0]
    qs = np.array([0.1, 0.25, 0.5, 0.75, 0.9])
    est, true = hist_quantiles(counts, qs), np.quantile(vals, qs)
    ratio = 10 ** (1 / BINS_PER_DECADE)
    assert np.all(est / true < ratio) and np.all(true / est < ratio)


def test_store_roundtrip_and_quantile_groups(built, tmp_path):
    tokens, dense, stats, feats, _ = built
    vocab = Vocab(np.frombuffer(b"".join(f"t{i}".encode() for i in range(V)), dtype=np.uint8),
                  np.cumsum([0] + [len(f"t{i}") for i in range(V)]), np.zeros(V, dtype=bool))
    man = {"kind": "saekit-feature-store", "format_version": 1, "d_sae": N, "tokens": N_CTX * (T - 1),
           "config": {**CFG.__dict__, "quantile_groups": 3}, "map_method": "pca"}
    write_store(tmp_path, man, stats, feats, tokens, vocab)
    store = FeatureStore(tmp_path)
    f = int(stats["count"].argmax())
    feat = store.feature(f)
    assert feat.count == int(stats["count"][f]) and feat.max == pytest.approx(float(stats["act_max"][f]))
    ex = feat.top[0]
    assert ex.context == int(feats["top_ctx"][f, 0]) and ex.tokens[ex.focus] == int(tokens[ex.context, ex.position])
    assert ex.acts[ex.focus] == pytest.approx(feat.max, rel=1e-3)
    assert ex.pieces == [f"t{t}" for t in ex.tokens]
    assert len(feat.groups) == 3
    for g in feat.groups:
        assert all(g.lo <= e.value < g.hi for e in g.examples)
    assert [g.q_hi for g in feat.groups] == sorted((g.q_hi for g in feat.groups), reverse=True)
    assert [n for n, _ in feat.neighbours] == feats["neighbour_id"][f].tolist()


def test_vocab_pieces_merge_multibyte(tiny_store):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_store["model"])
    vocab = Vocab.from_tokenizer(tok)
    text = "Le café était fermé — “délicieux” 日本語 🙂 3€"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = vocab.pieces(ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert "\ufffd" not in "".join(pieces)
    split = [i for i in ids if vocab.token_bytes(i) and not _complete(vocab.token_bytes(i))]
    assert split, "the test text should hold a character split across tokens"
    assert "\\x" in vocab.token_str(split[0])  # a partial character alone is shown as escapes
    store = FeatureStore(tiny_store["store"])
    assert store.vocab.pieces(ids) == pieces


def _complete(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_tiny_store_manifest_and_pages(tiny_store):
    man = manifest(tiny_store["store"])
    assert man["hook"] == HOOK and man["tokens"] == 1500 and man["map_method"] in ("pca", "umap")
    assert man["final_norm_applied"] and man["source"] == "model" and man["sae_weights_sha256"]
    store = FeatureStore(tiny_store["store"])
    alive = np.nonzero(store.stats["count"])[0]
    assert len(alive) > 10
    f = store.feature(int(alive[0]))
    assert f.top and f.logits_top and f.profile and len(f.neighbours) == 10
    assert all("".join(e.pieces) for e in f.top)
    hits = store.search_tokens(f.profile[0]["string"], min_count=1).hits
    assert any(h.feature == f.id for h in hits)
    with pytest.raises(IndexError):
        store.feature(store.d_sae)


@pytest.mark.integration
def test_cached_harvest_builds_the_same_store(tiny_store, tmp_path):
    """`--activations` (no model forward) and the model pass give identical arrays."""
    from safetensors.torch import load_file

    from saekit.cache import ActivationCache
    from saekit.data import load_contexts
    from saekit.features import analyze
    from saekit.harvest import Harvester
    from saekit.lm import load_model

    man = manifest(tiny_store["store"])
    model = load_model(str(tiny_store["model"]))
    train, _ = load_contexts(model.tokenizer, str(tiny_store["data"]), 32, 0.1, 0)
    harvest = Harvester(model, [HOOK]).harvest(train.tokens, 1500, batch_contexts=7, progress=False)
    ActivationCache.write(tmp_path / "acts", harvest, {"model_arg": str(tiny_store["model"]), "dataset": str(tiny_store["data"]),
                                             "context_size": 32, "heldout_fraction": 0.1, "seed": 0})
    cfg = FeatureConfig(**{k: v for k, v in man["config"].items()})
    analyze(tiny_store["sae"], tmp_path / "store", cfg, activations=tmp_path / "acts", model=model, progress=False)
    got = manifest(tmp_path / "store")
    assert got["source"] == "activations" and got["timings"]["forward_seconds"] == 0.0
    for name in ("stats.safetensors", "features.safetensors", "contexts.safetensors"):
        a, b = load_file(tiny_store["store"] / name), load_file(tmp_path / "store" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k].double(), b[k].double(), atol=1e-4), (name, k)

    # The store leaves out the massive tokens of the threshold recorded at harvest in the cache, not its own
    norms = harvest.acts[HOOK].norm(dim=1)
    low = float(norms.quantile(0.9))  # a recorded threshold that makes a tenth of the tokens "massive"
    ActivationCache.write(tmp_path / "acts-low", harvest, {"model_arg": str(tiny_store["model"])},
                          massive={HOOK: {"multiple": 1.0, "median_norm": low, "threshold": low}})
    analyze(tiny_store["sae"], tmp_path / "store-low", cfg, activations=tmp_path / "acts-low", model=model, progress=False)
    got = manifest(tmp_path / "store-low")
    seen = got["tokens_seen"]
    assert got["massive_threshold"] == low and "activation cache" in got["massive_threshold_from"]
    assert got["massive_excluded"] == int((norms[:seen] > low).sum()) > 0


def test_labels_concurrent_sessions(tmp_path):
    labels = Labels(tmp_path, "hash")
    assert labels.get(3).version == 0
    e = labels.save(3, "money", "fires on currency")
    with pytest.raises(Conflict):
        labels.save(3, "stale edit", "", expected_version=0)
    assert labels.get(3).label == "money"
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            other = Labels(tmp_path)  # another session, its own connections
            for j in range(15):
                other.save(100 + k, f"w{k}-{j}", "n")
                cur = other.get(3)
                try:
                    other.save(3, f"t{k}", "", expected_version=cur.version)
                except Conflict:
                    pass
        except BaseException as ex:  # pragma: no cover - reported below
            errors.append(ex)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(labels.get(100 + k).label == f"w{k}-14" for k in range(6))
    assert labels.get(3).version > e.version
    assert {x.feature for x in labels.search("w2-")} == {102}
    assert labels.search("50%") == []  # LIKE wildcards in the query are literal
    import sqlite3

    assert sqlite3.connect(tmp_path / "labels.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_cli_analyze_and_browse_errors(tiny_store, tmp_path, capsys):
    from saekit.cli import main

    out = tmp_path / "store"
    assert main(["analyze", str(tiny_store["sae"]), "--out", str(out), "--tokens", "300", "--top-n", "3",
                 "--batch-contexts", "4", "--map", "pca"]) == 0
    assert manifest(out)["tokens"] == 300 and "saekit browse" in capsys.readouterr().out
    assert main(["browse", str(tmp_path / "nothing")]) == 2
    assert "saekit analyze" in capsys.readouterr().err


# ----------------------------------------------------------------------------- damaged stores

def _store_copy(tiny_store, tmp_path, name: str = "copy"):
    import shutil

    return shutil.copytree(tiny_store["store"], tmp_path / name, ignore=shutil.ignore_patterns("labels.sqlite*"))


@pytest.mark.parametrize("name", ["stats.safetensors", "features.safetensors", "contexts.safetensors",
                                  "vocab.safetensors"])
def test_damaged_store_file_fails_at_open_naming_it(tiny_store, tmp_path, name):
    """A truncated, padded, emptied, overwritten or missing tensor file is found when the store opens (headers
    only), not later on a page; the error names the file and says how to rebuild."""
    from saekit.errors import FileFormatError

    good = (tiny_store["store"] / name).read_bytes()
    damages = {"truncated": good[: len(good) - 7], "padded": good + b"\0" * 16, "empty": b"",
               "random": np.random.default_rng(0).bytes(len(good)), "header only": good[:40], None: None}
    for kind, data in damages.items():
        store = _store_copy(tiny_store, tmp_path, f"copy-{kind}")
        if data is None:
            (store / name).unlink()
        else:
            (store / name).write_bytes(data)
        with pytest.raises(FileFormatError) as e:
            FeatureStore(store)
        assert name in str(e.value) and "saekit analyze" in str(e.value), (kind, str(e.value))


def test_store_with_wrong_tensors_or_manifest_fails_at_open(tiny_store, tmp_path):
    from safetensors.torch import load_file, save_file

    from saekit.errors import FileFormatError
    from saekit.files import write_json

    store = _store_copy(tiny_store, tmp_path)
    feats = load_file(store / "features.safetensors")
    save_file({k: v for k, v in feats.items() if k != "hist"}, store / "features.safetensors")
    with pytest.raises(FileFormatError, match=r"features.safetensors lacks the tensors \['hist'\].*saekit analyze"):
        FeatureStore(store)
    save_file({**feats, "hist": feats["hist"][:-1]}, store / "features.safetensors")  # one latent short
    with pytest.raises(FileFormatError, match=r"features.safetensors: tensor 'hist' has shape .*64 latents"):
        FeatureStore(store)
    save_file({k: v for k, v in feats.items() if k != "logit_top_value"}, store / "features.safetensors")
    with pytest.raises(FileFormatError, match="logit_top_value"):  # logit arrays: all four or none
        FeatureStore(store)
    save_file({k: v for k, v in feats.items() if not k.startswith("logit_")}, store / "features.safetensors")
    assert FeatureStore(store).feature(0).logits_top == []  # a store without logit effects is fine
    save_file(feats, store / "features.safetensors")
    FeatureStore(store)

    man = manifest(store)
    write_json(store / "manifest.json", {k: v for k, v in man.items() if k != "d_sae"})
    with pytest.raises(FileFormatError, match="manifest.json lacks or garbles 'd_sae'.*saekit analyze"):
        FeatureStore(store)
    write_json(store / "manifest.json", {**man, "d_sae": 65})
    with pytest.raises(FileFormatError, match="stats.safetensors: tensor .* has shape .*65 latents"):
        FeatureStore(store)


def test_store_file_damaged_after_open_gives_file_format_error(tiny_store, tmp_path):
    """A file replaced by a truncated one while the browser runs: the next page load reports it, no raw error."""
    from saekit.errors import FileFormatError

    store_dir = _store_copy(tiny_store, tmp_path)
    store = FeatureStore(store_dir)
    good = (store_dir / "features.safetensors").read_bytes()
    (store_dir / "features.safetensors").unlink()  # the open mmap keeps the old inode; a new thread reopens
    (store_dir / "features.safetensors").write_bytes(good[:1000])
    errors = []
    t = threading.Thread(target=lambda: errors.append(_catch(lambda: store.feature(0))))
    t.start()
    t.join()
    assert isinstance(errors[0], FileFormatError) and "features.safetensors" in str(errors[0])


def _catch(fn):
    try:
        fn()
    except Exception as e:  # returned for the assertion in the calling thread
        return e
    return None
