"""Token ids and token text: BOS, separator and special ids of a tokenizer, each token's raw bytes, and how a
token is shown on its own or inside a sequence (`Vocab`, which needs no tokenizer once built)."""

from __future__ import annotations

import codecs
import json
from functools import cached_property

import numpy as np
import torch


def bos_id(tokenizer) -> int:
    """The id every context starts with: BOS, else EOS (tokenizers without a BOS token)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def separator_id(tokenizer) -> int:
    """The id packed between documents: `<|endoftext|>` where the vocabulary has it (chat tokenizers end
    turns with another EOS), else EOS, else BOS."""
    if "<|endoftext|>" in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id


def special_ids(tokenizer) -> list[int]:
    """Every special token's id, sorted, once each."""
    return sorted(set(tokenizer.all_special_ids))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte ↔ printable-character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def vocab_bytes(tokenizer) -> list[bytes]:
    """Each token id's raw bytes, undoing the tokenizer's byte-level (or SentencePiece byte-fallback) encoding.
    Decoding tokens one at a time garbles characters split across tokens; joining bytes does not."""
    ids = list(range(len(tokenizer)))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    special = set(special_ids(tokenizer))
    kind = ""
    try:
        dec = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
        kind = json.dumps(dec)
    except Exception:  # slow tokenizers have no backend; fall back to decoding each id
        pass
    byte_level = '"ByteLevel"' in kind
    byte_fallback = '"ByteFallback"' in kind or '"Metaspace"' in kind or "\u2581" in kind
    table = {c: b for b, c in _bytes_to_unicode().items()}
    out: list[bytes] = []
    for i, piece in zip(ids, pieces):
        if piece is None:
            out.append(b"")
        elif i in special:
            out.append(piece.encode())
        elif byte_level and all(c in table for c in piece):
            out.append(bytes(table[c] for c in piece))
        elif byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        elif byte_fallback or byte_level:
            out.append(piece.replace("\u2581", " ").encode())
        else:
            out.append(tokenizer.decode([i]).encode())
    return out


def display_token(s: str) -> str:
    """A token shown on its own: spaces as ␣, newline ↵, tab ⇥, other control characters as \\xNN."""
    s = s.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "⏎")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in s)


class Vocab:
    """Every token's bytes (one blob + offsets) and whether it is special: token strings and display pieces
    without a tokenizer. The feature store keeps one so its pages need no model."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, special: np.ndarray):
        self.blob, self.offsets, self.special = blob.tobytes(), offsets, special

    @classmethod
    def from_tokenizer(cls, tokenizer) -> Vocab:
        bs = vocab_bytes(tokenizer)
        offsets = np.zeros(len(bs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(b) for b in bs])
        special = np.zeros(len(bs), dtype=bool)
        special[[i for i in special_ids(tokenizer) if i < len(bs)]] = True
        return cls(np.frombuffer(b"".join(bs) or b"\0", dtype=np.uint8), offsets, special)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"bytes": torch.from_numpy(np.frombuffer(self.blob, dtype=np.uint8).copy()),
                "offsets": torch.from_numpy(self.offsets), "special": torch.from_numpy(self.special)}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def token_bytes(self, i: int) -> bytes:
        return self.blob[self.offsets[i]: self.offsets[i + 1]] if 0 <= i < len(self) else b""

    def token_str(self, i: int) -> str:
        """One token on its own; bytes of a partial character are shown as \\xNN escapes."""
        return self.token_bytes(int(i)).decode("utf-8", errors="backslashreplace")

    def pieces(self, ids) -> list[str]:
        """Display strings for a token sequence: bytes are decoded as one stream, so each token shows the
        characters that end in it (a character split over two tokens appears whole on the second)."""
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out = [dec.decode(self.token_bytes(int(i))) for i in ids]
        if out:
            out[-1] += dec.decode(b"", final=True)
        return out

    @cached_property
    def strings(self) -> list[str]:
        return [self.token_str(i) for i in range(len(self))]
