"""Models beyond the default: tiny random Gemma-3, Qwen-3 and GPT-2 models load from GGUF files and from HF
directories, harvest and train; a model that cannot load is a SaekitError.

Each tiny model is written twice: as an HF directory (save_pretrained) and as an fp32 GGUF file laid out as
llama.cpp's converter does (tensor names from gguf's TensorNameMap, Gemma norms stored as 1 + w, GPT-2's
Conv1D weights transposed), with a small byte-level BPE tokenizer in its metadata.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from saekit.errors import ModelError, SaekitError

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens")

WORDS = "the cat sat on a mat while rain fell over quiet hills and rivers ran to the sea at dawn".split()

# Byte-level BPE (GPT-2, Qwen): specials first (unk/separator, BOS, EOS), the 256 bytes, then merged tokens.
BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_MERGES = ["Ġ t", "h e", "i n", "Ġ a", "e r", "o n", "Ġt he", "r e", "Ġ s", "a t", "e n", "o r", "Ġ w",
              "Ġ o", "i s", "e s", "Ġ c", "a n", "i t", "Ġ b"]
# SentencePiece with byte fallback (Gemma): pad, eos, bos, unk, the 256 byte pieces, then pieces whose merges
# transformers rebuilds from their order.
SPM_PIECES = ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁t", "he", "▁the", "in", "er", "an", "at", "on", "▁a", "▁s"]


def bpe_vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return BPE_SPECIALS + [bytes_to_unicode()[b] for b in range(256)] + [m.replace(" ", "") for m in BPE_MERGES]


def spm_vocab() -> list[str]:
    return ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES


BPE_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
SPM_IDS = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
CLASSES = {"gemma3": "Gemma3ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}


def configs() -> dict[str, object]:
    """llama.cpp architecture name → a tiny transformers config its GGUF metadata fully describes."""
    from transformers import Gemma3TextConfig, GPT2Config, Qwen3Config

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=256)
    bpe = dict(vocab_size=len(bpe_vocab()), **BPE_IDS)
    return {
        "gemma3": Gemma3TextConfig(**small, head_dim=32, vocab_size=len(spm_vocab()), **SPM_IDS, sliding_window=16),
        # transformers reads no head_dim from a qwen3 GGUF, so the tiny model keeps Qwen-3's 128
        "qwen3": Qwen3Config(**small, **bpe, tie_word_embeddings=True),
        # a gpt2 GGUF states n_ctx, not n_positions (the width of wpe), so the tiny model keeps 1024
        "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=2, **bpe),
    }


def add_tokenizer(w, kind: str) -> None:
    """llama.cpp's tokenizer metadata: 'gpt2' (byte-level BPE) or 'llama' (SentencePiece)."""
    vocab, ids, n_special = (bpe_vocab(), BPE_IDS, 3) if kind == "gpt2" else (spm_vocab(), SPM_IDS, 4)
    w.add_tokenizer_model(kind)
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    if kind == "gpt2":
        w.add_token_types([3] * n_special + [1] * (len(vocab) - n_special))  # 3: control, 1: normal
        w.add_token_merges(BPE_MERGES)
        w.add_unk_token_id(0)
    else:
        w.add_token_types([3] * n_special + [6] * 256 + [1] * len(SPM_PIECES))  # 6: byte
        w.add_token_scores([0.0] * (n_special + 256) + [-float(i) for i in range(len(SPM_PIECES))])
        w.add_unk_token_id(3)
    w.add_bos_token_id(ids["bos_token_id"])
    w.add_eos_token_id(ids["eos_token_id"])
    w.add_pad_token_id(ids["pad_token_id"])
    w.add_add_bos_token(False)


def write_gguf(model, arch: str, path) -> None:
    """An fp32 GGUF of `model` that transformers' GGUF loader reads back exactly."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", cfg.num_attention_heads))
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(cfg.rope_parameters.get("rope_theta")
                             or cfg.rope_parameters["full_attention"]["rope_theta"])
    if arch == "gemma3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_sliding_window(cfg.sliding_window)
    add_tokenizer(w, "llama" if arch == "gemma3" else "gpt2")
    enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(enum, cfg.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        a = t.detach().float().numpy()
        if arch == "gemma3" and "norm.weight" in name:
            a = a + 1  # Gemma's RMSNorm scales by 1 + w; llama.cpp stores the scale
        if arch == "gpt2" and name.split(".")[-2] in ("attn_qkv", "attn_output", "ffn_up", "ffn_down") \
                and suffix == "weight":
            a = a.T  # GPT-2's Conv1D keeps [in, out]
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{arch: (hf_dir, gguf_file)} for each tiny model, with the dequantize cache in a temporary dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("tiny_models")
    saved = os.environ.get("SAEKIT_CACHE")
    os.environ["SAEKIT_CACHE"] = str(root / "cache")
    try:
        out = {}
        for arch, cfg in configs().items():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg).eval()
            write_gguf(model, arch, root / f"tiny-{arch}.gguf")
            # the HF directory gets the tokenizer transformers builds from the GGUF
            tokenizer = AutoTokenizer.from_pretrained(str(root), gguf_file=f"tiny-{arch}.gguf")
            model.save_pretrained(root / arch)
            tokenizer.save_pretrained(root / arch)
            out[arch] = (root / arch, root / f"tiny-{arch}.gguf")
        yield out
    finally:
        if saved is None:
            os.environ.pop("SAEKIT_CACHE", None)
        else:
            os.environ["SAEKIT_CACHE"] = saved


def contexts(tokenizer, n: int = 12, size: int = 64) -> torch.Tensor:
    """[n, size] token ids of seeded random text, BOS first."""
    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) for _ in range(n * size))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: n * (size - 1)]
    body = torch.tensor(ids).view(n, size - 1)
    return torch.cat([torch.full((n, 1), tokenizer.bos_token_id), body], dim=1)


@pytest.mark.parametrize("arch", list(CLASSES))
def test_gguf_and_hf_dir_load_alike_harvest_and_train(tiny, arch, tmp_path):
    from saekit.config import SaeConfig, TrainConfig
    from saekit.harvest import Harvester
    from saekit.lm import load_model, unembedding
    from saekit.train import Trainer

    hf_dir, gguf_file = tiny[arch]
    hook = "blocks.1.hook_resid_pre"
    acts = {}
    for source in (hf_dir, gguf_file):
        model = load_model(str(source))
        assert type(model.original_model).__name__ == CLASSES[arch]
        assert model.cfg.n_layers == 2 and model.cfg.d_model == 64
        W_U, w_norm = unembedding(model)
        assert W_U.shape == (64, model.cfg.d_vocab) and w_norm is not None and w_norm.shape == (64,)
        ctx = contexts(model.tokenizer)
        assert model.tokenizer.unk_token_id not in ctx  # every word is spelled in the tiny vocabulary
        acts[source.suffix] = Harvester(model, [hook]).harvest(ctx, tokens=600, progress=False).acts[hook]
    # the GGUF holds the HF weights exactly (fp32), so both loads see the same activations
    torch.testing.assert_close(acts[".gguf"], acts[""], rtol=1e-4, atol=1e-4)

    x = acts[".gguf"]
    cfg = TrainConfig(saes=[SaeConfig(d_in=64, d_sae=64, k=4)], batch_size=128, epochs=2, device="cpu",
                      warmup_steps=2, log_every=1)
    trainer = Trainer(cfg, x, tmp_path / "sae")
    dirs = trainer.fit(progress=False)
    assert len(dirs) == 1 and (dirs[0] / "cfg.json").is_file()
    fvu = next(v for k, v in trainer.history[-1].items() if k.endswith("/fvu"))
    assert np.isfinite(fvu) and fvu < 1


def test_gemma_final_norm_scale_is_one_plus_weight(tiny):
    from saekit.lm import load_model, unembedding

    model = load_model(str(tiny["gemma3"][0]))
    weight = model.original_model.model.norm.weight
    torch.testing.assert_close(unembedding(model)[1], 1 + weight)


def test_gguf_rebuilt_config_names_no_architecture(tiny):
    """Why lm.py names the architecture itself: a config rebuilt from GGUF metadata has no `architectures`, and
    Gemma-3's model type (gemma3_text) is not one transformer-lens maps to an adapter by itself."""
    from transformers import AutoConfig

    hf_dir, gguf_file = tiny["gemma3"]
    config = AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    assert not config.architectures and config.model_type == "gemma3_text"


def test_unsupported_architecture_is_a_model_error(tiny, tmp_path):
    """BioGPT: transformers loads it, transformer-lens has no adapter for it."""
    from transformers import AutoTokenizer, BioGptConfig, BioGptForCausalLM

    from saekit.lm import load_model

    torch.manual_seed(0)
    cfg = BioGptConfig(vocab_size=len(bpe_vocab()), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64)
    BioGptForCausalLM(cfg).save_pretrained(tmp_path / "biogpt")
    AutoTokenizer.from_pretrained(str(tiny["gpt2"][0])).save_pretrained(tmp_path / "biogpt")
    with pytest.raises(SaekitError) as e:
        load_model(str(tmp_path / "biogpt"))
    msg = str(e.value)
    assert isinstance(e.value, ModelError)
    assert "biogpt" in msg and "BioGptForCausalLM" in msg and "Gemma3ForCausalLM" in msg


def test_corrupt_gguf_is_a_model_error(tiny, tmp_path):
    from saekit.lm import load_model

    good = tiny["qwen3"][1]
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(SaekitError) as e:
        load_model(str(bad))
    assert isinstance(e.value, ModelError) and str(bad) in str(e.value)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="junk.gguf"):
        load_model(str(junk))


def test_gguf_of_an_architecture_transformers_cannot_read_is_a_model_error(tmp_path):
    from saekit.lm import load_model

    path = tmp_path / "tiny-rwkv6.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv6")
    w.add_block_count(1)
    add_tokenizer(w, "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((len(bpe_vocab()), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError) as e:
        load_model(str(path))
    assert "rwkv6" in str(e.value) and "gemma3" in str(e.value)


def test_missing_and_foreign_paths_are_model_errors(tmp_path):
    from saekit.lm import load_model

    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "absent.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_not_a_gguf_file_is_a_model_error_before_any_loading(tmp_path, monkeypatch, capsys):
    """Random bytes, an empty file, the magic followed by noise, a header announcing more than the file holds:
    each a ModelError naming the file and saying what to do, found from the header before transformers or the
    GGUF reader trust it (nothing is 'dequantized', nothing is cached)."""
    from saekit.lm import load_model

    monkeypatch.setenv("SAEKIT_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    cases = {
        "random.gguf": (rng.bytes(200_000), "does not start with the bytes 'GGUF'"),
        "empty.gguf": (b"", "is empty"),
        "magic.gguf": (b"GGUF" + rng.bytes(10_000), "claims GGUF version"),
        "short.gguf": (b"GGUF\x03\x00\x00\x00", "truncated"),
        "counts.gguf": (b"GGUF" + (3).to_bytes(4, "little") + (10**12).to_bytes(8, "little")
                        + (5).to_bytes(8, "little") + rng.bytes(1000), "announces 1,000,000,000,000 tensors"),
        "future.gguf": (b"GGUF" + (4).to_bytes(4, "little") + bytes(16), "pip install -U gguf"),
    }
    for name, (data, why) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelError) as e:
            load_model(str(tmp_path / name))
        msg = str(e.value)
        assert str(tmp_path / name) in msg and why in msg, msg
        assert "again" in msg or "pip install" in msg, msg
    assert "dequantizing" not in capsys.readouterr().out and not (tmp_path / "cache").exists()


def test_paths_that_are_no_model_say_what_model_takes(tmp_path):
    from saekit.lm import load_model

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("not a model")
    named = tmp_path / "looks.gguf"  # a directory named like a GGUF file
    named.mkdir()
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x" * 64)
    for path, why in ((texts, "no config.json"), (named, "no config.json"), (weights, "not a .gguf file"),
                      (tmp_path / "absent" / "model", "does not exist")):
        with pytest.raises(ModelError) as e:
            load_model(str(path))
        msg = str(e.value)
        assert str(path) in msg and why in msg and "--model takes 'default', a .gguf file" in msg, msg


def test_sharded_hf_dir_loads_and_a_missing_tensor_is_a_model_error(tiny, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from saekit.lm import load_model

    source = tiny["qwen3"][0]
    sharded = tmp_path / "sharded"
    shutil.copytree(source, sharded)
    (sharded / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(sharded, max_shard_size="200KB")
    assert type(load_model(str(sharded)).original_model).__name__ == "Qwen3ForCausalLM"

    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, broken / "model.safetensors")
    with pytest.raises(ModelError, match=r"broken.*up_proj"):
        load_model(str(broken))
