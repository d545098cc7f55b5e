"""llama/parallel/context.py: document masks (packed rows equal their documents run alone) and context
parallelism (CP2, CP4 and MP2 x CP2 over gloo equal one process: the loss and every gradient)."""

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama import parallel
from llama.model import ModelArgs, Transformer
from llama.parallel.context import DocumentMask, chunk_indices, shard_batch, token_index
from llama.train.batches import IGNORE
from tests.helpers import run_distributed

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=1024)


def packed_row(lengths, seed=0, vocab=128):
    """tokens (1, T) of random documents of `lengths`, their positions (1, T) restarting at each."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    return docs, torch.cat(docs)[None], torch.cat([torch.arange(n) for n in lengths])[None]


def reference_mask(positions: torch.Tensor, q_index: torch.Tensor) -> torch.Tensor:
    """(B, 1, T_q, S) from document numbers counted token by token: the definition, not the formula."""
    B, S = positions.shape
    doc = torch.zeros(B, S, dtype=torch.long)
    for b in range(B):
        for j in range(1, S):
            doc[b, j] = doc[b, j - 1] + int(positions[b, j] != positions[b, j - 1] + 1)
    out = torch.zeros(B, 1, len(q_index), S, dtype=torch.bool)
    for b in range(B):
        for i, q in enumerate(q_index.tolist()):
            out[b, 0, i, : q + 1] = doc[b, : q + 1] == doc[b, q]
    return out


def test_chunks_are_head_and_tail_and_cover_the_sequence():
    assert chunk_indices(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert chunk_indices(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    for cp in (1, 2, 4):
        every = torch.cat([chunk_indices(64, cp, r) for r in range(cp)])
        assert sorted(every.tolist()) == list(range(64))


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_document_mask_and_its_attention_equal_the_dense_mask(cp):
    """The mask from positions equals documents counted token by token; its blockwise attention (each run
    of queries over its own key range only) equals SDPA with the whole boolean mask, rows without a
    boundary (the lower-right triangle path) included."""
    _, _, with_docs = packed_row([5, 9, 3, 11, 4])
    single = torch.arange(32)[None]  # one document: pure causal
    positions = torch.cat([with_docs, single])  # (2, 32): two rows, different layouts
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 32, 8, generator=g), torch.randn(2, 2, 32, 8, generator=g), torch.randn(2, 2, 32, 8, generator=g)
    for rank in range(cp):
        index = chunk_indices(32, cp, rank)
        mask = DocumentMask(index, positions)
        assert torch.equal(mask.dense(), reference_mask(positions, index))
        grads = []
        for m in (mask, mask.dense()):  # the outputs and the gradients of q, k and v (blocks are split, not sliced)
            qkv = [t.clone().requires_grad_() for t in (q, k, v)]
            out = F.scaled_dot_product_attention(qkv[0][:, :, index], *qkv[1:], attn_mask=m, enable_gqa=True)
            grads.append([out, *torch.autograd.grad(out, qkv, torch.cos(torch.arange(out.numel()).view(out.shape)))])
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        causal = DocumentMask(index, single)
        assert len(causal.blocks[0]) == (1 if rank == cp - 1 else 2)  # a triangle per chunk (the middle two touch)
        torch.testing.assert_close(F.scaled_dot_product_attention(q[:1, :, index], k[:1], v[:1], attn_mask=causal, enable_gqa=True),
                                   F.scaled_dot_product_attention(q[:1, :, index], k[:1], v[:1], attn_mask=causal.dense(),
                                                                  enable_gqa=True), atol=1e-6, rtol=0)


def test_packed_row_logits_equal_each_document_alone():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**ARGS))
    model.init_weights(3)
    docs, row, positions = packed_row([37, 100, 8, 61, 1, 49])
    x, _, layout = shard_batch(row, row, positions, IGNORE)
    with torch.no_grad():
        packed = model(x, **layout)
        alone = torch.cat([model(d[None]) for d in docs], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_a_documents_loss_does_not_depend_on_its_neighbours():
    """Bit for bit, token by token: other neighbours, longer or shorter, before or after it, or none (its
    attention is a block of its own; the projections compute each token's row alone)."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**ARGS))
    model.init_weights(3)
    doc = packed_row([40], seed=99)[1][0]

    def doc_losses(lengths, seed, at):  # the per-token losses of `doc` put in place of document `at`
        _, row, positions = packed_row(lengths, seed)
        start = sum(lengths[:at])
        row[0, start : start + 40] = doc
        x, _, layout = shard_batch(row, row, positions, IGNORE)
        with torch.no_grad():
            logits = model(x, **layout)[0, start : start + 39]
        return F.cross_entropy(logits, doc[1:], reduction="none")  # (39,)

    alone = doc_losses([40], seed=1, at=0)
    for lengths, seed, at in [([23, 40, 17], 2, 1), ([23, 40, 17], 3, 1), ([5, 40, 60], 4, 1), ([40, 11], 5, 0),
                              ([1, 1, 40], 6, 2)]:
        assert torch.equal(doc_losses(lengths, seed, at), alone), lengths


# ---------------------------------------------------------------------------- processes (slow)

T = 1024  # tokens per row: documents of 300, 200, 1 and 523 tokens in row 0, one document in row 1
LENGTHS = [300, 200, 1, 523]


def batch():
    _, row0, pos0 = packed_row(LENGTHS, seed=5)
    row1 = torch.randint(0, 128, (1, T + 1), generator=torch.Generator().manual_seed(6))
    inputs = torch.cat([row0, row1[:, :-1]])
    targets = torch.cat([torch.roll(row0, -1, 1), row1[:, 1:]])
    targets[0, torch.tensor(LENGTHS).cumsum(0) - 1] = IGNORE  # a document's last token predicts nothing
    return inputs, targets, torch.cat([pos0, torch.arange(T)[None]])


def grads_worker(mp: int, cp: int, variant: str):
    """One rank: the summed loss over its tokens and the full gradient of every parameter, summed over
    the context-parallel ranks (what DDP / FSDP do) and gathered over model parallel."""
    import fairscale.nn.model_parallel.initialize as fs_init
    import torch.distributed as dist

    from llama import lora
    from llama.train.loop import enable_activation_checkpointing, loss_sum

    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    parallel.init_distributed(mp, context_parallel_size=cp)
    assert (parallel.model_parallel_size(), parallel.context_parallel_size()) == (mp, cp)
    assert parallel.init_distributed(mp, context_parallel_size=cp) == mp  # a second run in this process
    if cp > 1:
        with pytest.raises(parallel.ParallelError, match=f"context parallel {cp}"):
            parallel.init_distributed(mp, context_parallel_size=1)
    model = Transformer(ModelArgs(**ARGS))
    model.init_weights(7)
    chunks = 1
    dropout = nullcontext()
    if variant == "checkpointed+chunks+lora":  # LoRA with B nonzero, so that A has a gradient too
        lora.add_lora(model, rank=4, alpha=8.0, dropout=0.1, targets=["wq", "wv", "w2"])
        # the masks of rows 0 and 1 of a run, at this rank's tokens (the training loop's call)
        dropout = lora.dropout_rows(model, [0, 1], 0, T, token_index(T))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B.weight"):
                    full = torch.randn(parallel.full_shape(name, p.shape), generator=torch.Generator().manual_seed(len(name)))
                    p.copy_(parallel.shard(name, 0.02 * full))
        enable_activation_checkpointing(model)
        chunks = 3
    inputs, targets, positions = batch()
    with dropout:
        loss = loss_sum(model, inputs, targets, chunks, positions)
        loss.backward()
    loss = loss.detach()
    if cp > 1:
        dist.all_reduce(loss, group=parallel.context_parallel_group())
    grads = {}
    for name, p in model.named_parameters():
        if cp > 1:
            dist.all_reduce(p.grad, group=parallel.context_parallel_group())
        grads[name] = parallel.gather(name, p.grad)
    return float(loss), grads


LAYOUTS = [(1, 4, "plain"), (2, 2, "plain"), (1, 2, "plain"), (1, 2, "checkpointed+chunks+lora")]


def layouts_worker():
    return {layout: grads_worker(*layout) for layout in LAYOUTS}


@pytest.mark.slow
def test_context_parallel_equals_one_process():
    """CP4, MP2 x CP2 and CP2 (4 gloo processes; the rest data parallel) at 1,024 tokens per row, one row
    of four documents and one of a single document: the loss and every parameter's gradient equal one
    process within 1e-5; so does CP2 with activation checkpointing, loss_chunks=3 and LoRA (dropout 0.1:
    each rank draws one process's masks at its own tokens)."""
    ranks = run_distributed(layouts_worker, 4)
    for layout in LAYOUTS:
        want_loss, want = grads_worker(1, 1, layout[2])
        for rank in ranks:
            loss, grads = rank[layout]
            assert loss == pytest.approx(want_loss, abs=1e-5 * abs(want_loss)), layout
            assert grads.keys() == want.keys() and len(grads) > 0
            for name in want:
                torch.testing.assert_close(grads[name], want[name], atol=1e-5, rtol=0, msg=f"{layout} {name}")


# ---------------------------------------------------------------------------- training (slow)

COMMON = ["max_steps=5", "micro_batch_size=2", "grad_clip=0.5", "packing=true", "seq_len=64"]


def train_layouts_worker(data_dir, root):
    """4 ranks: CP2 x FSDP2, then MP2 x CP2 (DDP of 1), each a training run with document masks."""
    import fairscale.nn.model_parallel.initialize as fs_init

    from tests.helpers import tiny_train

    out = {}
    for name, extra in [("cp2_fsdp2", ["context_parallel_size=2", "data_parallel=fsdp"]),
                        ("mp2_cp2", ["model_parallel_size=2", "context_parallel_size=2"])]:
        if fs_init.model_parallel_is_initialized():
            fs_init.destroy_model_parallel()
        out[name] = tiny_train(data_dir, Path(root) / name, *COMMON, *extra)["losses"]
    return out


@pytest.mark.slow
def test_context_parallel_training_equals_one_process_and_resumes_at_cp1(corpus, tmp_path):
    """train.py with packing=true: CP2 x FSDP2 and MP2 x CP2 (4 gloo processes) log the loss and gradient
    norm of one process at every step (1e-5). A CP2 run stopped after step 3 resumes on one process
    (context_parallel_size=1) and finishes as the uninterrupted run does."""
    from tests.helpers import read_metrics, tiny_train, train_worker

    data_dir, _ = corpus
    tiny_train(data_dir, tmp_path / "one", *COMMON)
    reference = read_metrics(tmp_path / "one")
    ranks = run_distributed(train_layouts_worker, 4, data_dir, tmp_path)
    assert all(r == ranks[0] for r in ranks)
    run_distributed(train_worker, 2, data_dir, tmp_path / "resumed", COMMON + ["context_parallel_size=2", "max_steps=3",
                                                                              "save_every=3"])
    tiny_train(data_dir, tmp_path / "resumed", *COMMON, "resume=true", "context_parallel_size=1")
    for name in ["cp2_fsdp2", "mp2_cp2", "resumed"]:
        curve = read_metrics(tmp_path / name)
        assert [m["step"] for m in curve] == [1, 2, 3, 4, 5], name
        for got, want in zip(curve, reference):
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-5), (name, got["step"])
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], abs=1e-5), (name, got["step"])
