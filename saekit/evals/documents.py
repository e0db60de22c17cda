"""Labelled documents and their activations at a hook: the examples of sparse probing and TPP.

Each document is one example: BOS then its first `context - 1` tokens, run through the model once; the
activations of every token but BOS are kept (float16) so that any number of SAEs can be pooled from one pass."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import DataError


@dataclass
class Labelled:
    texts: list[str]
    labels: torch.Tensor  # [n] class ids
    names: list[str]  # class id → label


def labelled_documents(dataset: str = "default", label_column: str = "label", text_column: str = "text") -> Labelled:
    """Documents and class labels: 'default' (BBC News, the label is the folder: business, entertainment,
    politics, sport, tech), a directory with one subfolder of text files per label, or json/jsonl/parquet files
    with a `label_column`."""
    from ..data import _read_text_file, default_corpus_files

    files = default_corpus_files() if dataset == "default" else None
    path = Path(dataset).expanduser()
    if files is None and path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md"))
    if files:
        texts, labels = [_read_text_file(f) for f in files], [Path(f).parent.name for f in files]
        if len(set(labels)) < 2:
            raise DataError(f"{dataset}: probing takes labels from the text files' folders, and all sit in "
                            f"{labels[0]!r}; put each class in its own subfolder, or pass json/jsonl/parquet files "
                            "with a label column (--label-column).")
    else:
        import datasets

        from ..data import _local_files

        local = _local_files(dataset)
        kinds = {{".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(Path(f).suffix) for f in local}
        if not local or None in kinds or len(kinds) > 1:
            raise DataError(f"{dataset!r}: probing reads labelled local data: 'default', a directory with one "
                            "subfolder of text files per label, or json/jsonl/parquet files with a label column.")
        datasets.disable_progress_bars()
        ds = datasets.load_dataset(kinds.pop(), data_files=local, split="train")
        for column, flag in ((label_column, "--label-column"), (text_column, "--text-column")):
            if column not in ds.column_names:
                raise DataError(f"dataset {dataset!r} has no column {column!r} (its columns are {ds.column_names}); "
                                f"name the column holding the {'class label' if column == label_column else 'text'} "
                                f"with {flag}.")
        rows = [(t, str(y)) for t, y in zip(ds[text_column], ds[label_column]) if isinstance(t, str) and t.strip()]
        texts, labels = [t for t, _ in rows], [y for _, y in rows]
    names = sorted(set(labels))
    if len(names) < 2:
        raise DataError(f"dataset {dataset!r} has a single label ({names}); probing needs two classes or more.")
    index = {n: i for i, n in enumerate(names)}
    return Labelled(texts, torch.tensor([index[y] for y in labels]), names)


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of up to `n` examples (0: all), as even over the classes as they allow, in a seeded order."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    if n == 0 or n >= len(labels):
        return order
    classes = labels.unique()
    per = {int(c): order[labels[order] == c] for c in classes}
    take, quota = [], n // len(classes)
    for c in per:
        take.append(per[c][:quota])
    chosen = torch.cat(take)
    rest = order[~torch.isin(order, chosen)][: n - len(chosen)]
    return torch.cat([chosen, rest])[torch.randperm(n, generator=gen)]


def split_examples(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) indices, stratified by class: whole documents (or words) are held out."""
    gen = torch.Generator().manual_seed(seed + 1)
    train, test = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero()[:, 0]
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = max(1, round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


@dataclass
class DocumentActivations:
    """The hook's activations on each document's tokens (BOS dropped): acts [n, T, d] float16, mask [n, T]."""

    acts: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    names: list[str]
    hook: str
    model: str
    seconds: float
    raw_probes: dict = field(default_factory=dict, repr=False)
    """Probe results on the raw activations, which every SAE's probing shares (keyed by split, k and seed)."""

    def mean_pooled(self) -> torch.Tensor:
        """[n, d] float32: the mean over each document's tokens (SAEBench pools its probes' inputs this way)."""
        m = self.mask[..., None].float()
        return (self.acts.float() * m).sum(1) / m.sum(1).clamp_min(1)

    def last_token(self) -> torch.Tensor:
        last = self.mask.long().cumsum(1).argmax(1)
        return self.acts[torch.arange(len(self.acts)), last].float()

    def pooled_latents(self, sae, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean-pooled, last-token) SAE latent activations [n, d_sae] (float32), encoded token by token."""
        n, T, d = self.acts.shape
        flat = self.acts.reshape(-1, d)[self.mask.flatten()]
        doc = torch.arange(n).repeat_interleave(self.mask.sum(1))
        pooled = torch.zeros(n, sae.cfg.d_sae)
        last = torch.zeros(n, sae.cfg.d_sae)
        is_last = torch.zeros(len(flat), dtype=torch.bool)
        is_last[self.mask.sum(1).cumsum(0) - 1] = True
        with torch.no_grad():
            for i in range(0, len(flat), batch):
                v, idx = sae.encode(flat[i: i + batch].float())
                rows = doc[i: i + batch, None].expand_as(idx)
                pooled.index_put_((rows.flatten(), idx.flatten()), v.flatten().float(), accumulate=True)
                sel = is_last[i: i + batch]
                last.index_put_((rows[sel].flatten(), idx[sel].flatten()), v[sel].flatten().float(), accumulate=True)
        return pooled / self.mask.sum(1, keepdim=True).clamp_min(1), last


@torch.no_grad()
def document_activations(model, hook: str, data: Labelled, context: int = 128, batch: int = 16,
                         progress: bool = True) -> DocumentActivations:
    """One model pass over the documents (up to the hook's layer), keeping the hook's activations."""
    from ..lm import check_hooks, model_id, stop_layer
    from ..tokens import bos_id, special_ids

    check_hooks(model, [hook])
    tok = model.tokenizer
    bos = bos_id(tok)
    ids = tok(data.texts, add_special_tokens=False)["input_ids"]
    keep_ids = [[t for t in doc if t not in set(special_ids(tok))][: context - 1] for doc in ids]
    if empty := sum(1 for d in keep_ids if not d):
        raise DataError(f"{empty} of the probing documents have no tokens; drop the empty ones.")
    T = max(len(d) for d in keep_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else bos
    tokens = torch.full((len(ids), T + 1), pad, dtype=torch.long)
    mask = torch.zeros(len(ids), T, dtype=torch.bool)
    for i, d in enumerate(keep_ids):
        tokens[i, 0] = bos
        tokens[i, 1: 1 + len(d)] = torch.tensor(d)
        mask[i, : len(d)] = True
    device = next(model.parameters()).device
    stop = stop_layer(model, [hook])
    acts = None
    start = time.perf_counter()
    order = mask.sum(1).argsort(descending=True)  # similar lengths together: padding costs forwards
    bar = tqdm(total=int(mask.sum()), desc="probing documents", unit="tok", unit_scale=True, disable=not progress,
               dynamic_ncols=True)
    for lo in range(0, len(order), batch):
        rows = order[lo: lo + batch]
        width = int(mask[rows].sum(1).max()) + 1
        store = {}
        model.run_with_hooks(tokens[rows, :width].to(device), stop_at_layer=stop,
                             fwd_hooks=[(hook, lambda a, hook, store=store: store.setdefault("a", a.detach()))])
        a = store["a"][:, 1:].to("cpu", torch.float16)  # causal: right padding leaves the real tokens untouched
        if acts is None:
            acts = torch.zeros(len(ids), T, a.shape[-1], dtype=torch.float16)
        acts[rows, : width - 1] = a
        bar.update(int(mask[rows].sum()))
    bar.close()
    acts = acts * mask[..., None]
    return DocumentActivations(acts, mask, data.labels, data.names, hook, model_id(model), time.perf_counter() - start)
