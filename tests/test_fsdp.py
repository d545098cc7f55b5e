"""llama/train/fsdp.py: FSDP2 x Fairscale model parallel trains like one process, checkpoints in Meta's
layout, resumes at other data-parallel sizes and after SIGKILL, runs over two (simulated) nodes,
and holds about half of DDP's state per rank."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llama import parallel
from llama.common.errors import UserError
from llama.train import fsdp
from llama.model import ModelArgs
from llama.train.config import DEFAULT_MODEL, ConfigError, check_layout, load_config
from tests.helpers import free_port, run_distributed
from tests.helpers import ROOT, TINY_TRAIN, read_metrics, run_main, tiny_config, tiny_train as train

# Five steps of 8 sequences in micro-batches of 2 (accumulation on every layout), clipping active.
COMMON = ["max_steps=5", "micro_batch_size=2", "save_every=5", "grad_clip=0.5"]
TOL = 1e-5


# ---------------------------------------------------------------------------- config (fast)


def test_bad_combinations_are_one_line_errors(tmp_path, monkeypatch):
    import train as train_script

    with pytest.raises(ConfigError, match='data_parallel=\'zero\': use "ddp" or "fsdp"'):
        load_config(None, ["data_parallel=zero"])
    with pytest.raises(ConfigError, match='reshard_after_forward=false .* needs data_parallel="fsdp"'):
        load_config(None, ["reshard_after_forward=false"])
    cfg = load_config(None, ["data_parallel=fsdp", "model_parallel_size=2"])
    with pytest.raises(ConfigError, match="model_parallel_size=2 does not divide the 3 processes"):
        check_layout(cfg, ModelArgs(**DEFAULT_MODEL), 3)
    monkeypatch.setattr(fsdp, "fully_shard", None)  # what a torch without it leaves
    with pytest.raises(fsdp.FSDPError, match=r"needs torch.distributed.fsdp.fully_shard \(torch >= 2.6"):
        fsdp.require_fully_shard()
    done = run_main(train_script.main, "reshard_after_forward=false", f"out_dir={tmp_path / 'out'}")  # the real
    # process's exit status is tested once, in test_train_config
    assert done.returncode == 1 and done.stderr.startswith("error: reshard_after_forward=false"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_one_process_fsdp_is_plain_training_with_a_dcp_checkpoint(corpus, tmp_path):
    """No process group to shard over: the same curve as ddp, the optimizer saved with DCP."""
    data_dir, _ = corpus
    plain = train(data_dir, tmp_path / "ddp", "max_steps=2", "save_every=2")
    sharded = train(data_dir, tmp_path / "fsdp", "max_steps=2", "save_every=2", "data_parallel=fsdp")
    assert sharded["losses"] == plain["losses"]
    ckpt = Path(sharded["checkpoint"])
    assert fsdp.is_fsdp_checkpoint(ckpt) and (ckpt / "consolidated.00.pth").is_file()
    assert "optimizer" not in torch.load(ckpt / "train_state.00.pth", weights_only=True)


# ---------------------------------------------------------------------------- processes (slow)


def layouts_worker(data_dir, root):
    """One rank of MP=2 x DP=2: FSDP ZeRO-3, FSDP ZeRO-2 and DDP runs, then per-rank state bytes."""
    results = {}
    for name, extra in [("zero3", ["data_parallel=fsdp"]),
                        ("zero2", ["data_parallel=fsdp", "reshard_after_forward=false"]),
                        ("ddp", [])]:
        results[name] = train(data_dir, Path(root) / name, *COMMON, "model_parallel_size=2", *extra)["losses"]
    for name, extra in [("ddp_bytes", []), ("fsdp_bytes", ["data_parallel=fsdp"])]:
        results[name] = measure_state(data_dir, Path(root) / name, "model_parallel_size=2", *extra)
    return results


def measure_state(data_dir, out_dir, *overrides):
    """Parameters + gradients + AdamW states on this rank after one step (tensor bytes)."""
    from train import setup
    from llama.train.loop import loss_sum, train_step

    run = setup(tiny_config(data_dir, out_dir, *overrides))
    dp, rank = parallel.data_parallel_size(), parallel.data_parallel_rank()
    micro = run.data.batches.train_micro_batches(0, run.cfg.batch_size, run.cfg.micro_batch_size, rank, dp)
    train_step(run, micro, 0)  # AdamW's moments exist from here on
    x, y = micro[0]
    loss_sum(run.net.forward, x, y).backward()  # and gradients
    run.log.close()
    return fsdp.state_bytes(run.net.model, run.optimizer)


def fsdp_worker(data_dir, out_dir, overrides):
    return train(data_dir, out_dir, *overrides)


@pytest.mark.slow
def test_fsdp_layouts_match_one_process(corpus, tmp_path):
    """MP=2 x FSDP=2 (4 ranks; ZeRO-3 and ZeRO-2) and MP=1 x FSDP=2 (with activation checkpointing):
    loss and grad norm at every step and the final weights equal one process within 1e-5. The FSDP
    checkpoint loads with load_model at MP=1 and gives the DDP run's logits. Each FSDP rank holds
    at most 0.55x the parameter + gradient + optimizer bytes of a DDP rank."""
    from llama.checkpoint import load_model

    data_dir, _ = corpus
    single = train(data_dir, tmp_path / "single", *COMMON)
    reference = read_metrics(tmp_path / "single")
    four = run_distributed(layouts_worker, 4, data_dir, tmp_path)
    run_distributed(fsdp_worker, 2, data_dir, tmp_path / "mp1",
                    COMMON + ["data_parallel=fsdp", "activation_checkpointing=true"])
    assert all(r["zero3"] == four[0]["zero3"] for r in four)  # every rank logged the same loss
    assert four[0]["zero2"] == pytest.approx(four[0]["zero3"], abs=1e-6)
    for name in ["zero3", "zero2", "ddp", "mp1"]:
        curve = read_metrics(tmp_path / name)
        assert len(curve) == 5, name
        for got, want in zip(curve, reference):
            assert got["loss"] == pytest.approx(want["loss"], abs=TOL), name
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], abs=TOL), name
    assert single["losses"] == [m["loss"] for m in reference]
    want = load_model(tmp_path / "single/step_000005", max_seq_len=32).state_dict()
    for name in ["zero3", "mp1"]:
        ckpt = tmp_path / name / "step_000005"
        assert sorted(p.name for p in ckpt.glob("consolidated.*.pth")) == (
            ["consolidated.00.pth", "consolidated.01.pth"] if name == "zero3" else ["consolidated.00.pth"])
        got = load_model(ckpt, max_seq_len=32)  # Meta's layout, merged to MP=1
        for key, value in got.state_dict().items():
            torch.testing.assert_close(value, want[key], atol=TOL, rtol=0, msg=f"{name} {key}")
    tokens = torch.randint(0, 640, (2, 32))
    ddp = load_model(tmp_path / "ddp/step_000005", max_seq_len=32)
    torch.testing.assert_close(got(tokens), ddp(tokens), atol=2e-4, rtol=1e-4)
    for rank in four:
        ddp_bytes, fsdp_bytes = (sum(rank[k].values()) for k in ("ddp_bytes", "fsdp_bytes"))
        assert rank["ddp_bytes"]["grads"] == rank["ddp_bytes"]["params"] > 0
        assert fsdp_bytes <= 0.55 * ddp_bytes, (rank["fsdp_bytes"], rank["ddp_bytes"])
    # Resuming the MP=2 FSDP checkpoint at MP=1: one line saying to convert it first, nothing written.
    # (resume reuses the run's saved keys, so MP=1 has to be asked for; unasked, the run's MP=2 needs
    # 2 processes, also one line)
    before = sorted(p.name for p in (tmp_path / "zero3").iterdir())
    with pytest.raises(UserError, match=r"model_parallel_size=1 differs from model_parallel_size=2.*convert it "
                                        r"first \(python -m llama.convert .* --to meta --shards 1\) and start a new "
                                        r"run with init_from"):
        train(data_dir, tmp_path / "zero3", *COMMON, "max_steps=6", "data_parallel=fsdp", "resume=true",
              "model_parallel_size=1")
    with pytest.raises(UserError, match=r"model_parallel_size=2 needs 2 processes"):
        train(data_dir, tmp_path / "zero3", *COMMON, "max_steps=6", "data_parallel=fsdp", "resume=true")
    assert sorted(p.name for p in (tmp_path / "zero3").iterdir()) == before


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_at_other_data_parallel_sizes(corpus, tmp_path):
    """Written at DP=2, resumed at DP=1 (one process) and DP=4: the uninterrupted run's losses."""
    data_dir, _ = corpus
    args = ["max_steps=6", "micro_batch_size=2", "save_every=3", "keep_last=0", "data_parallel=fsdp"]
    full = run_distributed(fsdp_worker, 2, data_dir, tmp_path / "dp2", args)[0]
    for dp in [1, 4]:
        out = tmp_path / f"dp{dp}"
        shutil.copytree(tmp_path / "dp2", out)
        shutil.rmtree(out / "step_000006")
        (out / "latest").write_text("step_000003")  # a crash after step 3's save
        if dp == 1:
            resumed = train(data_dir, out, *args, "resume=true")
        else:
            resumed = run_distributed(fsdp_worker, dp, data_dir, out, args + ["resume=true"])[0]
        assert resumed["first_step"] == 3
        assert resumed["losses"] == pytest.approx(full["losses"][3:], abs=TOL), dp


def _torchrun_node(node_rank: int, port: int, args, log):
    """One 'node' of a two-node job on this machine: c10d rendezvous on localhost."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
           "--rdzv-id", "fsdp-test", str(ROOT / "train.py"), *args]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (torchrun starts its workers in new sessions, so
    killing its process group would leave them training)."""
    psutil = pytest.importorskip("psutil")
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


@pytest.mark.slow
def test_two_node_fsdp_run_killed_with_sigkill_resumes_to_the_same_losses(corpus, tmp_path):
    """Two torchrun invocations (--nnodes 2, rendezvous c10d on localhost) train FSDP over 2 DP
    ranks: their curve equals one process's. Both are SIGKILLed mid-run; resuming from the last
    complete checkpoint continues the uninterrupted curve."""
    data_dir, _ = corpus
    out = tmp_path / "killed"
    base = TINY_TRAIN + [f"data={data_dir}", "decay_steps=40", "save_every=3", "micro_batch_size=2"]
    args = base + [f"out_dir={out}", "max_steps=100000", "data_parallel=fsdp"]
    port = free_port()
    with open(tmp_path / "node0.log", "w") as log0, open(tmp_path / "node1.log", "w") as log1:
        nodes = [_torchrun_node(0, port, args, log0), _torchrun_node(1, port, args, log1)]
        deadline = time.time() + 400
        while time.time() < deadline and not ((out / "latest").is_file()
                                              and (out / "latest").read_text() >= "step_000006"):
            assert all(n.poll() is None for n in nodes), (tmp_path / "node0.log").read_text()[-3000:]
            time.sleep(0.05)
        for n in nodes:  # a whole node going down: the launcher and its workers (their own sessions)
            _kill_tree(n.pid)
            n.wait()
    saved = int((out / "latest").read_text().split("_")[1])
    assert saved >= 6
    killed_curve = read_metrics(out)
    overrides = ["decay_steps=40", "save_every=3", "micro_batch_size=2", f"max_steps={saved + 2}"]
    reference = train(data_dir, tmp_path / "reference", *overrides)
    for got, want in zip(killed_curve[:saved], reference["losses"]):  # two nodes == one process
        assert got["loss"] == pytest.approx(want, abs=TOL)
    resumed = train(data_dir, out, *overrides, "data_parallel=fsdp", "resume=true")
    assert resumed["first_step"] == saved
    assert resumed["losses"] == pytest.approx(reference["losses"][saved:], abs=TOL)
