"""Batches from a prepared data directory (llama/data/prepare.py), read through memmap.

Sequences are numbered globally. Pretraining: sequence i of the training split is the window of
seq_len + 1 tokens starting at i * seq_len (inputs are the first seq_len, targets the last seq_len),
so windows share one token and cover the stream; documents inside a window are separated by their
BOS/EOS tokens. SFT: sequence i is dialog i, cut to its first seq_len + 1 tokens; a dialog left with
no assistant token to learn from by the cut is dropped (it would train on nothing: loss 0, no
gradient). The run's log says how many were cut and dropped; if every training dialog is dropped,
the run refuses to start. Preference pairs
(llama/data/pairs.py): item i is pair i, two sequences that must fit seq_len + 1 whole; a batch of
b pairs is 2b rows, the b chosen sequences then the b rejected ones (llama/train/dpo.py).

Each epoch visits the training items (sequences, or pairs) in a fresh order drawn from (seed, epoch). Step s's global
batch is the next `batch_size` sequences of that order; data-parallel rank r takes rows
[r * B/dp, (r+1) * B/dp) of it. The batch is therefore the same whatever the layout, which is what
makes MP x DP runs match a single process, and "how many sequences were consumed" is the whole
data position a resumed run needs.

Packing (`packing = true`, the Llama 3 recipe): documents share rows without seeing each other. A
micro-batch then carries a third tensor, each token's RoPE position counted from its document's first
token, from which the model's document mask is built (llama/parallel/context.py). Pretraining: the
same windows, positions restarting at every document start inside (prepare records them in
offsets.npy). SFT: the training dialogs, in a fixed seeded order, are packed best-fit-decreasing in
windows (best_fit_decreasing) into rows of at most seq_len inputs (a dialog keeps its own input/target
pairs, so none predicts the next one's first token); the epochs shuffle those rows. Held-out dialogs
are packed next-fit in file order, so the first validation rows are the first held-out dialogs.
"""

import bisect
import math
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from llama.data.prepare import DataError, read_meta

IGNORE = -100  # target id that cross_entropy skips: masked (non-assistant) and padded positions


class TokenStream:
    """One logical array over several shard files (memory-mapped: nothing is read until used)."""

    def __init__(self, root: Path, shards: List[dict], dtype):
        self.maps = []
        for s in shards:
            path = root / s["file"]
            if not path.is_file() or path.stat().st_size != s["tokens"] * np.dtype(dtype).itemsize:
                raise DataError(f"{path} is missing or truncated: prepare the data again")
            self.maps.append(np.memmap(path, dtype=dtype, mode="r"))
        self.starts = np.cumsum([0] + [s["tokens"] for s in shards])

    def read(self, start: int, end: int) -> np.ndarray:
        pieces = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < end:
            local = start - self.starts[shard]
            take = min(end, self.starts[shard + 1]) - start
            pieces.append(np.asarray(self.maps[shard][local : local + take]))
            start += take
            shard += 1
        return np.concatenate(pieces) if len(pieces) != 1 else pieces[0]


def next_fit(lengths: np.ndarray, capacity: int) -> List[np.ndarray]:
    """Indices into `lengths` in order, cut into rows whose lengths add up to at most `capacity`."""
    rows, start, used = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > capacity and i > start:
            rows.append(np.arange(start, i))
            start, used = i, 0
        used += n
    return rows + ([np.arange(start, len(lengths))] if len(lengths) > start else [])


PACK_WINDOW = 64  # rows' worth of tokens that best_fit_decreasing packs together


def best_fit_decreasing(lengths: np.ndarray, capacity: int, window: int = PACK_WINDOW) -> List[np.ndarray]:
    """Indices into `lengths` (each <= capacity) in rows whose lengths add up to at most `capacity`.
    `lengths` is cut, in order, into windows of about `window` rows' worth (item i is in window
    (tokens before it) // (window * capacity)); in a window the longest items go first (ties: the
    earlier), each into the fullest row that still has room for it (ties: the older row), else into a
    new row. A row lists its indices in increasing order; rows come window by window, oldest first.
    Windows bound the work (a window's rows are a sorted list) and keep every row's items from one
    stretch of the order; a window wastes about its last row's free space."""
    windows = (np.cumsum(lengths) - lengths) // (window * capacity)  # (n,) non-decreasing
    rows = []
    for items in np.split(np.arange(len(lengths)), np.flatnonzero(np.diff(windows)) + 1):
        members, free = [], []  # free: sorted (room left, row number) of this window's rows
        for i in items[np.argsort(-lengths[items], kind="stable")].tolist():
            n = int(lengths[i])
            at = bisect.bisect_left(free, (n, -1))  # the least room that is >= n
            if at < len(free):
                room, row = free.pop(at)
            else:
                room, row = capacity, len(members)
                members.append([])
            members[row].append(i)
            bisect.insort(free, (room - n, row))
        rows += [np.array(sorted(m)) for m in members]
    return rows


class Batches:
    def __init__(self, root, seq_len: int, seed: int, packing: bool = False):
        self.root, self.seq_len, self.seed, self.packing = Path(root), seq_len, seed, packing
        self.meta = read_meta(root)
        self.pairs = self.meta["kind"] == "pairs"
        self.sft = self.meta["kind"] == "sft" or self.pairs  # whole masked sequences, read by document
        self.per_item = 2 if self.pairs else 1  # sequences per training item
        self.tokens = TokenStream(self.root, self.meta["shards"], np.uint32)
        self.fit_report = None
        if packing or self.sft:
            if not (self.root / "offsets.npy").is_file():
                raise DataError(f"{root} has no offsets.npy (where documents start): prepare it again to train "
                                f"with packing=true")
            self.offsets = np.load(self.root / "offsets.npy")
        if self.sft:
            self.masks = TokenStream(self.root, self.meta["mask_shards"], np.uint8)
            split = self.meta["val_document_start"]
            if self.pairs:  # every pair must fit whole (no cut, no drop): its two sequences in file order
                check_pairs_fit(self.root, self.meta, self.offsets, seq_len)
                self.dialogs = {"train": np.arange(split), "val": np.arange(split, self.meta["n_documents"])}
                self.counts = {k: len(v) // self.per_item for k, v in self.dialogs.items()}
            else:
                self.dialogs = self._fitting_dialogs(split)
                self.counts = {k: len(v) for k, v in self.dialogs.items()}
            if packing:  # rows of dialogs (their places in self.dialogs): training ones in a seeded order
                inputs = np.minimum(np.diff(self.offsets), seq_len + 1) - 1  # (documents,) inputs per dialog
                order = np.random.default_rng([seed, 1 << 20]).permutation(self.counts["train"])
                val = np.arange(self.counts["val"])
                self.rows = {"train": [order[r] for r in best_fit_decreasing(inputs[self.dialogs["train"]][order], seq_len)],
                             "val": [val[r] for r in next_fit(inputs[self.dialogs["val"]], seq_len)]}
                self.counts = {k: len(v) for k, v in self.rows.items()}
        else:
            split = self.meta["val_start"]
            self.counts = {"train": max(0, (split - 1) // seq_len),
                           "val": max(0, (self.meta["n_tokens"] - split - 1) // seq_len)}
        if self.counts["train"] == 0:
            what = "pairs" if self.pairs else "dialogs" if self.sft else f"tokens, fewer than seq_len + 1 = {seq_len + 1}"
            raise DataError(f"data {root} has no training sequences ({split} training {what}): "
                            f"add data or lower seq_len / val_fraction")
        self._order = (None, None)  # (epoch, permutation) of the training sequences

    def _fitting_dialogs(self, split: int) -> dict:
        """{"train", "val"}: the numbers of the dialogs that keep an assistant token (a target) within
        their first seq_len + 1 tokens; a DataError if no training dialog does. Sets fit_report."""
        starts, ends = self.offsets[:-1], self.offsets[1:]
        cut = np.minimum(ends, starts + self.seq_len + 1)
        # targets of a sequence are its tokens 1..: sum the mask over [start + 1, cut) of every dialog
        mask = np.append(self.masks.read(0, int(self.offsets[-1])), np.uint8(0))  # (N + 1,), reduceat's end
        bounds = np.stack([starts + 1, cut], axis=1).reshape(-1)  # non-decreasing: cut <= next start
        targets = np.add.reduceat(mask, bounds, dtype=np.int64)[0::2]
        kept = (targets > 0) & (starts + 1 < cut)
        n, n_cut, n_dropped = len(starts), int((ends > cut).sum()), int((~kept).sum())
        if n_cut:
            self.fit_report = (f"SFT dialogs are cut to seq_len + 1 = {self.seq_len + 1} tokens: {n_cut} of {n} "
                               f"({100 * n_cut / n:.1f}%) cut, {n_dropped} ({100 * n_dropped / n:.1f}%) dropped "
                               f"(no assistant token left); the longest has {int((ends - starts).max())} tokens")
        index = np.arange(n)
        dialogs = {"train": index[:split][kept[:split]], "val": index[split:][kept[split:]]}
        if split and not len(dialogs["train"]):
            source = ", ".join(self.meta.get("sources", [])) or str(self.root)
            raise DataError(f"data {source}: none of the {split} training dialogs has an assistant token within its "
                            f"first seq_len + 1 = {self.seq_len + 1} tokens (seq_len={self.seq_len}; the longest "
                            f"dialog has {int((ends - starts).max())}): raise seq_len or shorten the dialogs")
        return dialogs

    def __len__(self) -> int:
        return self.counts["train"]

    def _sequence(self, index: int, split: str) -> Tuple[np.ndarray, np.ndarray]:
        """Tokens (L,) and their 0/1 train mask (L,) of one sequence, L <= seq_len + 1."""
        if self.sft:
            doc = int(self.dialogs[split][index])
            start = int(self.offsets[doc])
            end = min(int(self.offsets[doc + 1]), start + self.seq_len + 1)
            return self.tokens.read(start, end), self.masks.read(start, end)
        start = index * self.seq_len + (0 if split == "train" else self.meta["val_start"])
        tokens = self.tokens.read(start, start + self.seq_len + 1)
        return tokens, np.ones_like(tokens, dtype=np.uint8)

    def _packed(self, index: int, split: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inputs, targets, positions) of packed row `index`, each (n,) with n <= seq_len."""
        if not self.sft:  # a window of the stream, positions counted from each document start inside it
            tokens, _ = self._sequence(index, split)
            start = index * self.seq_len + (0 if split == "train" else self.meta["val_start"])
            at = np.arange(start, start + len(tokens) - 1)
            first = np.maximum(self.offsets[np.searchsorted(self.offsets, at, side="right") - 1], start)
            return tokens[:-1], tokens[1:], at - first
        pieces = []
        for doc in self.rows[split][index]:
            tokens, mask = self._sequence(int(doc), split)
            targets = np.where(mask[1:] == 1, tokens[1:].astype(np.int64), IGNORE)
            pieces.append((tokens[:-1], targets, np.arange(len(tokens) - 1)))
        return tuple(np.concatenate(p) for p in zip(*pieces))

    def collate_packed(self, rows) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs, targets and positions (b, T) of packed rows, padded to the longest: the padding is a
        document of its own (positions from 0), untrained."""
        T = max(len(x) for x, _, _ in rows)
        inputs = torch.zeros(len(rows), T, dtype=torch.long)
        targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        positions = torch.zeros(len(rows), T, dtype=torch.long)
        for row, (x, y, pos) in enumerate(rows):
            n = len(x)
            inputs[row, :n], targets[row, :n] = torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))
            positions[row, :n], positions[row, n:] = torch.from_numpy(pos), torch.arange(T - n)
        return inputs, targets, positions

    def _item(self, index: int, split: str) -> List[Tuple[np.ndarray, np.ndarray]]:
        """The sequences of one training item: one, or a pair's chosen and rejected."""
        return [self._sequence(self.per_item * index + k, split) for k in range(self.per_item)]

    def micro_batch(self, indices, split: str):
        """Items `indices` of `split` as one collated micro-batch: packed rows (inputs, targets,
        positions), or sequences; pairs give every chosen sequence, then every rejected one
        (llama/train/dpo.py reads them in that order)."""
        if self.packing:
            return self.collate_packed([self._packed(i, split) for i in indices])
        items = [self._item(i, split) for i in indices]
        return self.collate([item[k] for k in range(self.per_item) for item in items])

    def _train_index(self, g: int) -> int:
        """The g-th training sequence in visiting order (a new permutation each epoch)."""
        epoch, position = divmod(g, len(self))
        if self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(len(self)))
        return int(self._order[1][position])

    def collate(self, sequences: List[Tuple[np.ndarray, np.ndarray]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Inputs (b, T) and targets (b, T), padded to the longest; untrained targets are IGNORE."""
        T = max(len(t) for t, _ in sequences) - 1
        inputs = torch.zeros(len(sequences), T, dtype=torch.long)
        targets = torch.full((len(sequences), T), IGNORE, dtype=torch.long)
        for row, (tokens, mask) in enumerate(sequences):
            t = torch.from_numpy(tokens.astype(np.int64))
            n = len(t) - 1
            inputs[row, :n] = t[:-1]
            targets[row, :n] = t[1:].masked_fill(torch.from_numpy(mask[1:] == 0), IGNORE)
        return inputs, targets

    @staticmethod
    def train_rows(consumed: int, batch_size: int, dp_rank: int, dp: int) -> range:
        """This rank's rows of the global batch that starts after `consumed` sequences, as numbers g
        in the run's stream of training sequences (the same on every layout)."""
        per_rank = batch_size // dp
        return range(consumed + dp_rank * per_rank, consumed + (dp_rank + 1) * per_rank)

    def row_numbers(self, items) -> List[int]:
        """The numbers of a micro-batch's rows among the run's training sequences, from its items'
        numbers g (train_rows): g itself, or for pairs 2g (chosen) and 2g + 1 (rejected), rows in
        `collate`'s order (LoRA dropout draws each row's mask from its number)."""
        if not self.pairs:
            return list(items)
        return [2 * g for g in items] + [2 * g + 1 for g in items]

    def train_micro_batches(self, consumed: int, batch_size: int, micro: int, dp_rank: int, dp: int):
        """This rank's micro-batches of the global batch that starts after `consumed` sequences."""
        order = [self._train_index(g) for g in self.train_rows(consumed, batch_size, dp_rank, dp)]
        return [self.micro_batch(order[i : i + micro], "train") for i in range(0, len(order), micro)]

    def val_micro_batches(self, n_batches: int, batch_size: int, micro: int, dp_rank: int, dp: int):
        """The first n_batches global batches of the held-out split, in order (the same every time);
        this rank's micro-batches of them. Every rank gets as many micro-batches as the rank with the
        most rows (under FSDP each forward is a collective that every rank must join): a rank short
        of rows gets padding, one item (a sequence, or a pair) whose targets are all IGNORE (weight 0).
        Empty if there is no validation data."""
        total = min(self.counts["val"], n_batches * batch_size)
        mine = list(range(dp_rank, total, dp))  # round-robin so every rank gets a share
        batches = [self.micro_batch(mine[i : i + micro], "val") for i in range(0, len(mine), micro)]
        most = math.ceil(math.ceil(total / dp) / micro)  # rank 0's count: it has the most rows
        padding = (torch.zeros(self.per_item, self.seq_len, dtype=torch.long),  # one item: a sequence, or a pair
                   torch.full((self.per_item, self.seq_len), IGNORE))
        padding += (torch.arange(self.seq_len)[None],) if self.packing else ()  # positions: one document
        return batches + [padding] * (most - len(batches))


def check_pairs_fit(root: Path, meta: dict, offsets: np.ndarray, seq_len: int) -> None:
    """Every pair whole in seq_len + 1 tokens, or a DataError naming the longest by its file and line:
    a cut response would compare the log-probabilities of two partial replies."""
    lengths = np.diff(offsets).reshape(-1, 2).max(axis=1)  # (pairs,) the longer sequence of each pair
    too_long = np.flatnonzero(lengths > seq_len + 1)
    if too_long.size:
        worst = int(too_long[np.argmax(lengths[too_long])])
        file_index, line, prompt = np.load(root / "origins.npy")[worst].tolist()
        where = f"{meta['files'][file_index]}:{line}"
        what = (f"its prompt alone is {prompt} tokens" if prompt > seq_len else
                f"prompt and response are {lengths[worst]} tokens")
        raise DataError(f"data {root}: {too_long.size} of {len(lengths)} pairs do not fit seq_len={seq_len} (the "
                        f"longest, {where}: {what}): raise seq_len to {lengths[worst] - 1}, or shorten or remove them")
