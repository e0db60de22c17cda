"""Text → contexts (packing, splits, local files, bad datasets) and contexts → activations (the harvester
on the real model, the shuffle buffer, the on-disk cache)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import HOOK

from saekit.data import pack, read_documents, split_documents
from saekit.errors import DataError, HookError
from saekit.harvest import Harvester, ShuffleBuffer, keep_mask, massive_mask

DOCS = ["The bank raised rates.", "Shares fell sharply on Monday after the report.", "A short one.",
        "The striker scored twice in the final, and the club won the cup for the third time in five years."]


# ----------------------------------------------------------------------------- packing and splits

def test_pack_bos_first_separators_and_no_padding(tokenizer):
    ids = tokenizer(DOCS, add_special_tokens=False)["input_ids"]
    sep = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.bos_token_id
    assert (bos, sep) == (1, 0)  # SmolLM2: <|im_start|> first, <|endoftext|> between documents
    stream = [t for doc in ids for t in doc + [sep]]
    T = 8
    c = pack(DOCS, tokenizer, T)
    n = len(stream) // (T - 1)
    assert c.tokens.shape == (n, T) and c.tokens.dtype == torch.long
    assert (c.tokens[:, 0] == bos).all()
    # the bodies are exactly the stream, in order, cut at n·(T−1) tokens: no padding, nothing skipped
    assert c.tokens[:, 1:].flatten().tolist() == stream[: n * (T - 1)]
    assert c.usable_tokens == sum(1 for t in stream[: n * (T - 1)] if t not in tokenizer.all_special_ids)
    assert c.documents == len(DOCS)
    with pytest.raises(DataError, match="fewer than one context of 4096"):
        pack(DOCS, tokenizer, 4096)
    with pytest.raises(DataError, match="at least 2"):
        pack(DOCS, tokenizer, 1)


def test_split_documents_shares_no_document():
    docs = [f"document number {i}" for i in range(101)]
    train, held = split_documents(docs, 0.1, seed=0)
    assert len(held) == 11 and len(train) == 90  # ceil(10.1)
    assert not set(train) & set(held) and sorted(train + held) == sorted(docs)
    assert split_documents(docs, 0.1, seed=0) == (train, held)  # deterministic by seed
    assert split_documents(docs, 0.1, seed=1)[1] != held
    assert split_documents(docs, 0.0, seed=0)[1] == []
    with pytest.raises(DataError, match="too few"):
        split_documents(docs[:1], 0.5, seed=0)
    with pytest.raises(DataError, match=r"\[0, 1\)"):
        split_documents(docs, 1.0, seed=0)


def test_load_contexts_held_out_split_is_disjoint(default_contexts):
    train, held = default_contexts
    assert train.documents + held.documents == 2225
    assert held.documents == 112  # ceil(5% of 2225)
    assert train.tokens.shape[1] == held.tokens.shape[1] == 128


# ----------------------------------------------------------------------------- reading datasets

def test_read_documents_local_txt_jsonl_parquet(tmp_path):
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, d in enumerate(DOCS):
        (txt / f"{i}.txt").write_text(d + "\nsecond line")
    got = read_documents(str(txt))
    assert sorted(got) == sorted(d + "\nsecond line" for d in DOCS)  # one document per file, lines kept
    assert len(read_documents(str(txt / "*.txt"))) == 4  # a glob

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "label": i}) + "\n" for i, d in enumerate(DOCS)))
    assert read_documents(str(jsonl), text_column="body") == DOCS
    with pytest.raises(DataError, match=r"no column 'text'.*\['body', 'label'\].*--text-column"):
        read_documents(str(jsonl))

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS + ["", "   "]}), tmp_path / "d.parquet")
    assert read_documents(str(tmp_path / "d.parquet")) == DOCS  # blank texts dropped


def test_bad_datasets_raise_data_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no"):
        read_documents(str(empty))
    (empty / "blank.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(DataError, match="no non-empty text"):
        read_documents(str(empty / "blank.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match="could not read dataset"):
        read_documents(str(bad))
    notparquet = tmp_path / "x.parquet"
    notparquet.write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError, match="could not read dataset"):
        read_documents(str(notparquet))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("hello")
    (mixed / "b.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(DataError, match="mixed or unsupported"):
        read_documents(str(mixed))
    with pytest.raises(DataError, match="matches no local file and the hub is unreachable"):
        read_documents(str(tmp_path / "no-such-file-*.txt"))


def test_default_corpus_has_2225_documents():
    docs = read_documents("default")
    assert len(docs) == 2225  # BBC News
    assert all(d.strip() for d in docs)


def test_single_text_file_is_split_into_paragraphs_or_lines(tmp_path, tiny_store):
    """One text file is one document only when there are several files; alone, it is split at blank lines
    (or at lines when it has none), and too few documents to hold out from says what to do."""
    from transformers import AutoTokenizer

    from saekit.data import load_contexts

    paras = ["First paragraph,\nover two lines.", "Second one.", "  Third, indented.", "Fourth."]
    one = tmp_path / "one.txt"
    one.write_text("\n\n" + paras[0] + "\n\n" + paras[1] + "\n  \n\t\n\n" + paras[2] + "\r\n\r\n" + paras[3] + "\n")
    assert read_documents(str(one)) == paras
    assert read_documents(str(tmp_path / "o*.txt")) == paras  # a glob matching one file
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "a.md").write_text("\n\n".join(paras))
    assert read_documents(str(alone)) == paras  # the only file of a directory
    (alone / "b.md").write_text("another file\n\nof two paragraphs")
    assert len(read_documents(str(alone))) == 2  # several files: one document each, blank lines kept

    lines = tmp_path / "lines.txt"
    lines.write_text("line one\nline two\n   \nline three")  # a whitespace-only line is no paragraph break…
    assert read_documents(str(lines)) == ["line one\nline two", "line three"]  # …unless it is blank: it is
    lines.write_text("line one\nline two\r\nline three\n")
    assert read_documents(str(lines)) == ["line one", "line two", "line three"]

    single = tmp_path / "single.txt"
    single.write_text("just one sentence, no line break")
    docs = read_documents(str(single))
    assert docs == ["just one sentence, no line break"]
    with pytest.raises(DataError, match=r"only 1 document: .*--heldout-fraction 0.*directory of text files"):
        split_documents(docs, 0.05, seed=0)
    tok = AutoTokenizer.from_pretrained(tiny_store["model"])
    with pytest.raises(DataError, match="--heldout-fraction 0"):
        load_contexts(tok, str(single), context_size=8, heldout_fraction=0.05)
    train, held = load_contexts(tok, str(single), context_size=8, heldout_fraction=0)
    assert held is None and train.documents == 1

    story = tmp_path / "story.txt"
    story.write_text("\n\n".join(f"Paragraph {i}: the cat sat on a mat while rain fell." for i in range(40)))
    train, held = load_contexts(tok, str(story), context_size=16, heldout_fraction=0.1)
    assert (train.documents, held.documents) == (36, 4)
    with pytest.raises(DataError, match=r"held-out split \(1 of 40 documents\).*--heldout-fraction"):
        load_contexts(tok, str(story), context_size=64, heldout_fraction=0.01)


def test_binary_or_non_utf8_files_are_refused_as_text(tmp_path, tiny_store):
    from transformers import AutoTokenizer

    from saekit.data import load_contexts

    rng = np.random.default_rng(0)
    noise = tmp_path / "noise.txt"
    noise.write_bytes(rng.bytes(20_000))
    tok = AutoTokenizer.from_pretrained(tiny_store["model"])
    with pytest.raises(DataError, match=r"noise.txt is not UTF-8 text"):
        load_contexts(tok, str(noise), context_size=8, heldout_fraction=0)  # was accepted as one document
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"plain text" * 100 + b"\0" + b"more text")
    with pytest.raises(DataError, match=r"nul.txt is not UTF-8 text \(it holds NUL bytes"):
        read_documents(str(nul))
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("Grüße aus Köln\n\nzweiter Absatz", encoding="utf-16")
    with pytest.raises(DataError, match="utf16.txt is not UTF-8 text"):
        read_documents(str(utf16))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Le café était fermé à Noël.\n\nDeux.".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt is not UTF-8 text \(5 of its .* first at byte 6\).*iconv"):
        read_documents(str(latin))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("good text")
    (mixed / "b.txt").write_bytes(rng.bytes(3000))
    with pytest.raises(DataError, match=r"b.txt is not UTF-8 text"):
        read_documents(str(mixed))
    # a stray Latin-1 byte in a long UTF-8 text (one file of the default corpus has a '£' so) is replaced, as before
    stray = tmp_path / "stray.txt"
    stray.write_bytes("a £15m signing, ".encode() * 20 + b"a \xa315.8m signing")
    assert read_documents(str(stray)) == ["a £15m signing, " * 20 + "a \ufffd15.8m signing"]
    for suffix in ("jsonl", "parquet"):  # json/jsonl/parquet go through HF datasets, which refuses them too
        junk = tmp_path / f"junk.{suffix}"
        junk.write_bytes(rng.bytes(5000))
        with pytest.raises(DataError, match=rf"could not read dataset .*junk.{suffix}"):
            read_documents(str(junk))


# ----------------------------------------------------------------------------- the harvester

def test_keep_mask_and_massive_mask():
    toks = torch.tensor([[1, 5, 6, 0, 7], [1, 0, 9, 9, 2]])
    assert keep_mask(toks, [0, 1, 2]).tolist() == [[False, True, True, False, True],
                                                   [False, False, True, True, False]]
    norms = torch.tensor([1.0, 1.1, 0.9, 1.0, 12.0, 50.0])
    assert massive_mask(norms, 10.0).tolist() == [False] * 4 + [True, True]


@pytest.fixture(scope="module")
def harvested(model, default_contexts):
    ctx = default_contexts[0].tokens[:4]
    h = Harvester(model, [HOOK, "blocks.3.hook_mlp_out"]).harvest(ctx, 300, batch_contexts=2, progress=False)
    return ctx, h


def test_harvest_exact_count_and_dropped_positions(model, harvested):
    from saekit.tokens import special_ids

    ctx, h = harvested
    assert len(h) == 300 and h.meta["tokens"] == 300
    assert h.acts[HOOK].shape == (300, 576) and h.acts["blocks.3.hook_mlp_out"].shape == (300, 576)
    assert (h.positions > 0).all()
    assert not torch.isin(h.token_ids, torch.tensor(special_ids(model.tokenizer))).any()
    assert torch.equal(h.token_ids, ctx[h.context_ids, h.positions])
    # every kept position of the contexts used, in order, up to the budget
    keep = keep_mask(ctx, special_ids(model.tokenizer))
    ci, pi = keep.nonzero(as_tuple=True)
    assert torch.equal(h.context_ids, ci[:300]) and torch.equal(h.positions, pi[:300])
    assert h.meta["tokens_per_s"] > 0


def test_harvest_equals_a_direct_run_with_cache(model, harvested):
    ctx, h = harvested
    used = ctx[: int(h.context_ids.max()) + 1]
    with torch.no_grad():
        _, cache = model.run_with_cache(used, names_filter=[HOOK, "blocks.3.hook_mlp_out"])
    for hook in (HOOK, "blocks.3.hook_mlp_out"):
        torch.testing.assert_close(h.acts[hook], cache[hook][h.context_ids, h.positions].float(),
                                   rtol=1e-5, atol=1e-4)


def test_harvest_stops_just_past_the_deepest_hook(model):
    from saekit.lm import stop_layer

    assert Harvester(model, [HOOK]).stop == 16
    assert Harvester(model, ["blocks.3.hook_resid_pre", "blocks.7.hook_mlp_out"]).stop == 8
    assert stop_layer(model, ["blocks.29.hook_resid_post"]) is None  # the last block: run it all
    ran = []
    handles = [model.blocks[i].register_forward_hook(lambda *a, i=i: ran.append(i)) for i in (15, 16, 29)]
    try:
        Harvester(model, [HOOK]).forward(torch.tensor([[1, 504, 3174, 28]]))
    finally:
        for hd in handles:
            hd.remove()
    assert ran == [15]  # block 15 runs (its resid_pre is read at its input), 16 and later never do


def test_unknown_hook_lists_close_names(model):
    with pytest.raises(HookError, match=r"unknown hook 'blocks.15.hook_resid_pree'.*blocks.15.hook_resid_pre"):
        Harvester(model, ["blocks.15.hook_resid_pree"])
    with pytest.raises(HookError, match="Closest valid hook names"):
        Harvester(model, [HOOK, "resid_15"])


def test_harvest_more_than_the_data_holds(model, default_contexts):
    with pytest.raises(DataError, match="only .* usable tokens but 100000 were asked"):
        Harvester(model, [HOOK]).harvest(default_contexts[1].tokens[:1], 100_000, progress=False)


# ----------------------------------------------------------------------------- shuffle buffer

def test_shuffle_buffer_bounded_exactly_once_and_mixing():
    blocks = [torch.arange(i * 10, (i + 1) * 10)[:, None] for i in range(30)]  # 30 "contexts" of 10 rows
    buf = ShuffleBuffer(capacity=64, seed=0)
    sizes, out = [], []
    push = buf.push

    def tracked(rows):
        push(rows)
        sizes.append(len(buf))

    buf.push = tracked
    for b in buf.stream(iter(blocks), batch=20):
        out.append(b)
    assert all(len(b) == 20 for b in out)
    assert max(sizes) < 64 + 10  # never more than capacity plus one pushed block
    rows = torch.cat(out).flatten().tolist()
    assert sorted(rows) == list(range(300))  # every row exactly once (300 = 15 batches of 20)
    first_contexts = {r // 10 for r in out[0].flatten().tolist()}
    assert len(first_contexts) >= 4  # one batch draws on many contexts
    again = torch.cat(list(ShuffleBuffer(64, seed=0).stream(iter(blocks), 20)))
    assert torch.equal(again, torch.cat(out))  # deterministic by seed
    other = torch.cat(list(ShuffleBuffer(64, seed=1).stream(iter(blocks), 20)))
    assert not torch.equal(other, torch.cat(out))
