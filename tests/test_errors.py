"""Every bad input gets one clear line (issues 13 and 19): exit status 1, exactly one stderr line
starting `error:` that names the fix, no traceback; and a genuine bug keeps its traceback.

Families: model-shape files (params.json, config.json, model_config, [model] keys), command-line
flags of each CLI, Python API arguments, torchrun. The counts are in docs/reliability.md."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train as train_script
from llama import checkpoint, plan, tokenizer
from llama.generation import cli as generate_cli
from llama.checkpoint import convert
from llama.data import prepare as data
from llama.common.dtypes import parse_dtype
from llama.common.errors import ArgumentError, UserError
from llama.model import ModelArgs
from llama.model_args import ModelArgsError
from llama.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def assert_one_line(code, err: str, *words):
    """The contract: status 1, one `error:` line naming the problem and the fix, no traceback."""
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


def run(script, *args, timeout=300, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, *(["-m", script] if script.startswith("llama.") else [str(ROOT / script)]), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, **kw)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("tiny_hf")
    model = checkpoint.load_model(tiny_dir)
    checkpoint.save_hf(model.state_dict(), model.params, out)
    shutil.copy(tiny_dir / "tokenizer.model", out / "tokenizer.model")
    return out


def with_file(src: Path, dst: Path, name: str, content) -> Path:
    """A copy of checkpoint dir `src` (weights linked, not copied) with `name` replaced by `content`."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    (dst / name).unlink(missing_ok=True)
    (dst / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return dst


# ---------------------------------------------------------------------------- model-shape files

PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256, "multiple_of": 32,
          "rope_theta": 10000.0}
BAD_PARAMS = {
    "json-list": ([1, 2, 3], ["params.json", "JSON list"]),
    "broken-json": ("{not json", ["params.json", "not valid JSON"]),
    "dim-negative": ({**PARAMS, "dim": -128}, ["params.json", "'dim' = -128", "positive"]),
    "kv-zero": ({**PARAMS, "n_kv_heads": 0}, ["params.json", "'n_kv_heads' = 0", "divisor of n_heads"]),
    "layers-float": ({**PARAMS, "n_layers": 2.5}, ["params.json", "'n_layers' = 2.5", "whole number"]),
    "dim-string": ({**PARAMS, "dim": "128"}, ["params.json", "'dim' = '128'", "without quotes"]),
    "heads-bool": ({**PARAMS, "n_heads": True}, ["params.json", "'n_heads' = True", "integer"]),
    "kv-not-divisor": ({**PARAMS, "n_kv_heads": 3}, ["params.json", "'n_kv_heads' = 3", "pick a divisor"]),
    "dim-not-divisible": ({**PARAMS, "dim": 66}, ["params.json", "does not divide dim=66", "head_dim"]),
    "eps-zero": ({**PARAMS, "norm_eps": 0}, ["params.json", "'norm_eps' = 0", "positive"]),
    "theta-negative": ({**PARAMS, "rope_theta": -1.0}, ["params.json", "'rope_theta' = -1.0", "positive"]),
}


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_bad_params_json_is_one_line(case, tiny_dir, tmp_path, capsys):
    content, words = BAD_PARAMS[case]
    ckpt = with_file(tiny_dir, tmp_path / "ckpt", "params.json", content)
    code = generate_cli.main(["--ckpt-dir", str(ckpt), "--prompt", "Hi", "--max-gen-len", "1"])
    assert_one_line(code, capsys.readouterr().err, str(ckpt), *words)


BAD_CONFIG = {
    "hidden-big": ({"hidden_size": "big"}, ["config.json", "'hidden_size' = 'big'", "without quotes"]),
    "kv-zero": ({"num_key_value_heads": -2}, ["config.json", "'num_key_value_heads' = -2", "positive"]),
    "layers-float": ({"num_hidden_layers": 1.5}, ["config.json", "'num_hidden_layers' = 1.5"]),
    "eps-string": ({"rms_norm_eps": "small"}, ["config.json", "'rms_norm_eps' = 'small'", "without quotes"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIG))
def test_bad_hf_config_is_one_line(case, hf_dir, tmp_path, capsys):
    change, words = BAD_CONFIG[case]
    config = {**json.loads((hf_dir / "config.json").read_text()), **change}
    ckpt = with_file(hf_dir, tmp_path / "hf", "config.json", config)
    code = generate_cli.main(["--ckpt-dir", str(ckpt), "--prompt", "Hi", "--max-gen-len", "1"])
    assert_one_line(code, capsys.readouterr().err, str(ckpt), *words)


def test_hf_config_that_is_a_list(hf_dir, tmp_path):
    ckpt = with_file(hf_dir, tmp_path / "hf", "config.json", [])
    with pytest.raises(UserError, match="config.json: holds a JSON list"):
        checkpoint.read_model_args(ckpt)


def test_model_args_from_python_names_the_key():
    for bad, words in [(dict(dim="128"), "'dim' = '128'"), (dict(n_kv_heads=0), "'n_kv_heads' = 0"),
                       (dict(n_layers=0), "'n_layers' = 0"), (dict(head_dim=63), "'head_dim' = 63")]:
        with pytest.raises(ModelArgsError, match=words):
            ModelArgs(**bad)
    assert ModelArgs(dim=64, n_heads=4).head_dim == 16  # good shapes still build, defaults derived


def test_plan_model_file_checked_by_the_same_layer(tmp_path, capsys):
    for name, content, words in [("kv0.json", {**PARAMS, "n_kv_heads": 0}, ["'n_kv_heads' = 0"]),
                                 ("list.json", [1], ["not a params.json-style"])]:
        (tmp_path / name).write_text(json.dumps(content))
        assert_one_line(plan.main(["--model", str(tmp_path / name)]), capsys.readouterr().err, name, *words)


# ---------------------------------------------------------------------------- train.py configuration

TRAIN_CASES = {
    "kv-zero": (["model.n_kv_heads=0"], ["'model.n_kv_heads' = 0", "divisor of n_heads"]),
    "layers-zero": (["model.n_layers=0"], ["'model.n_layers' = 0", "at least 1"]),
    "layers-float": (["model.n_layers=2.5"], ["model.n_layers", "must be int"]),
    "dim-string": (['model.dim="128"'], ["model.dim", "must be int"]),
    "dim-indivisible": (["model.dim=130"], ["model.dim=130", "'n_heads' = 4", "pick a divisor"]),
    "dtype": (["dtype=fp8"], ["dtype='fp8'", "bf16 (bfloat16)"]),
    "device-foo": (["device=foo"], ["device='foo'", "use auto, cpu"]),
    "mp-indivisible": (["model_parallel_size=3"], ["model_parallel_size=3 does not divide n_heads=4"]),
    "mp-past-kv": (["model_parallel_size=4"], ["model_parallel_size=4 exceeds n_kv_heads=2", "at most 2"]),
    "seq-zero": (["seq_len=0"], ["seq_len", "positive"]),
    "unknown": (["model.n_layer=2"], ["model.n_layers"]),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_config_is_one_line(case, tmp_path, capsys):
    overrides, words = TRAIN_CASES[case]
    code = train_script.main([*overrides, f"out_dir={tmp_path / 'out'}"])
    assert_one_line(code, capsys.readouterr().err, *words)
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("content, words", [("{broken", ["not valid JSON"]), ("[1, 2]", ["JSON list"]),
                                            (json.dumps({**PARAMS, "dim": -128}), ["'dim' = -128"]),
                                            (json.dumps({**PARAMS, "wings": 2}), ["unknown config key 'wings'"])])
def test_train_model_config_file_is_named(content, words, tmp_path, capsys):
    shape = tmp_path / "shape.json"
    shape.write_text(content)
    code = train_script.main([f"model_config={shape}", f"out_dir={tmp_path / 'out'}"])
    assert_one_line(code, capsys.readouterr().err, str(shape), *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_train_device_cuda_without_a_gpu(tmp_path, capsys):
    code = train_script.main(["device=cuda", "max_steps=1", f"out_dir={tmp_path / 'out'}"])
    assert_one_line(code, capsys.readouterr().err, "device=cuda", "no CUDA GPU", "device=cpu")


def test_both_dtype_spellings_everywhere():
    assert load_config(None, ["dtype=fp16"]).dtype == load_config(None, ["dtype=float16"]).dtype == "float16"
    assert load_config(None, ["dtype=bf16"]).dtype == "bfloat16"
    assert generate_cli.build_parser().parse_args(["--dtype", "bf16"]).dtype == "bf16"
    assert generate_cli.build_parser().parse_args(["--dtype", "bfloat16"]).dtype == "bfloat16"
    assert parse_dtype("bf16") is parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype(torch.float16) is torch.float16 and parse_dtype(None) is None


def test_train_help_lists_every_key_with_its_default(capsys):
    from llama.train.config import FIELDS

    with pytest.raises(SystemExit) as exit_:
        train_script.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name, f in FIELDS.items():
        line = next((ln for ln in out.splitlines() if ln.startswith(f"  {name} = ")), None)
        assert line is not None, f"{name} missing from train.py --help"
        assert len(line.split(None, 3)) == 4, f"{name} has no description: {line!r}"
    assert '  lr = 0.003 ' in out and '  device = "auto" ' in out


# ---------------------------------------------------------------------------- generate.py flags

FLAG_CASES = {
    "show-probs": (["--show-probs", "-1"], ["--show-probs -1", "e.g. 5"]),
    "device-foo": (["--device", "foo"], ["--device 'foo'", "cpu, cuda"]),
    "system-no-chat": (["--system", "Be brief."], ["--system", "add --chat"]),
    "prompt-with-chat": (["--chat"], ["--prompt does nothing with --chat"]),
    "dtype": (["--dtype", "fp8"], None),  # argparse's own refusal (status 2, its usage line)
    "max-gen-len": (["--max-gen-len", "0"], ["--max-gen-len 0"]),
    "batch": (["--max-batch-size", "0"], ["--max-batch-size 0"]),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_generate_flags_fail_before_loading(case, capsys):
    flags, words = FLAG_CASES[case]
    if words is None:
        with pytest.raises(SystemExit) as exit_:
            generate_cli.main(["--prompt", "Hi", *flags])
        assert exit_.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err
        return
    code = generate_cli.main(["--prompt", "Hi", "--ckpt-dir", "/no/such/dir", *flags])  # refused before the path
    assert_one_line(code, capsys.readouterr().err, *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_generate_device_cuda_without_a_gpu(capsys):
    assert_one_line(generate_cli.main(["--prompt", "Hi", "--device", "cuda"]), capsys.readouterr().err,
                    "no CUDA GPU", "--device cpu")


def test_huge_max_seq_len_fails_before_allocating(tiny_dir, capsys):
    import time

    start = time.perf_counter()
    code = generate_cli.main(["--ckpt-dir", str(tiny_dir), "--prompt", "Hi", "--max-seq-len", str(10**12)])
    assert_one_line(code, capsys.readouterr().err, "max_seq_len=1000000000000", "GiB", "--max-seq-len")
    assert time.perf_counter() - start < 30  # no table of 10^12 positions was built


def test_generate_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        generate_cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for action in generate_cli.build_parser()._actions:
        if action.dest != "help":
            assert f"(default: {action.default})" in out or (action.dest == "show_probs" and "(default: 0)" in out), \
                action.dest


# ---------------------------------------------------------------------------- the Python API


@pytest.fixture(scope="module")
def llama(tiny_dir):
    from llama.generation import Llama

    return Llama.build(tiny_dir, max_seq_len=64, max_batch_size=2, device="cpu")


DIALOG = [{"role": "user", "content": "Hi"}]
API_CASES = {
    "prompts-str": (lambda m: m.text_completion("hello"), ["prompts is a str", "list of prompts"]),
    "prompts-int": (lambda m: m.text_completion([1, 2]), ["prompts[0] is a int", "generate()"]),
    "max-gen-len-zero": (lambda m: m.text_completion(["Hi"], max_gen_len=0), ["max_gen_len=0", "None"]),
    "max-gen-len-neg": (lambda m: m.chat_completion([DIALOG], max_gen_len=-1), ["max_gen_len=-1"]),
    "no-content": (lambda m: m.chat_completion([[{"role": "user"}]]), ["dialogs[0][0] has no 'content'"]),
    "dialog-dict": (lambda m: m.chat_completion({"role": "user", "content": "Hi"}), ["dialogs is a dict"]),
    "dialog-not-list": (lambda m: m.chat_completion([{"role": "user", "content": "Hi"}]),
                        ["dialogs[0] is a dict", "list of messages"]),
    "bad-role": (lambda m: m.chat_completion([[{"role": "robot", "content": "Hi"}]]), ["role 'robot'", "user"]),
    "content-not-str": (lambda m: m.chat_completion([[{"role": "user", "content": 5}]]), ["content is a int"]),
    "temperature": (lambda m: m.text_completion(["Hi"], temperature=-1), ["temperature=-1", "greedy"]),
    "too-many": (lambda m: m.text_completion(["a", "b", "c"], max_gen_len=1), ["max_batch_size=2"]),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_arguments_are_checked_where_they_enter(case, llama):
    call, words = API_CASES[case]
    with pytest.raises(UserError) as e:
        call(llama)
    assert "\n" not in str(e.value)
    for word in words:
        assert word in str(e.value)


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_seq_len=0), "max_seq_len=0"), (dict(max_seq_len=-1), "max_seq_len=-1"),
    (dict(max_batch_size=0), "max_batch_size=0"), (dict(max_seq_len=2.5), "max_seq_len=2.5"),
    (dict(dtype="fp8"), "dtype='fp8'"),
])
def test_build_and_load_model_arguments(kwargs, words, tiny_dir):
    from llama.generation import Llama

    with pytest.raises(UserError, match=words):
        Llama.build(tiny_dir, **kwargs)
    with pytest.raises(UserError, match=words):
        checkpoint.load_model(tiny_dir, **kwargs)


def test_build_accepts_short_dtype_names(tiny_dir):
    from llama.generation import Llama

    llama = Llama.build(tiny_dir, max_seq_len=32, max_batch_size=1, dtype="bf16", device="cpu")
    assert llama.model.tok_embeddings.weight.dtype == torch.bfloat16


def test_max_gen_len_zero_is_refused_not_read_as_none(llama):
    # before: `max_gen_len or max_seq_len - 1` generated 63 tokens for max_gen_len=0
    with pytest.raises(ArgumentError):
        llama.text_completion(["Hi"], max_gen_len=0, temperature=0)
    assert len(llama.generate([[1, 2]], 1, temperature=0)[0][0]) <= 1


# ---------------------------------------------------------------------------- the other CLIs


def test_other_clis_one_line(tmp_path, tiny_dir, capsys):
    cases = [
        (lambda: convert.main([str(tmp_path / "nope"), str(tmp_path / "o"), "--to", "hf"]), ["nope", "no such file"]),
        (lambda: data.main(["prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "d")]), ["nope"]),
        (lambda: tokenizer.main(["encode", "--tokenizer", str(tmp_path / "nope.model"), "hi"]), ["nope.model"]),
        (lambda: plan.main(["--model", "llama3.1-8b", "--mp", "3"]), ["--mp 3 does not divide n_heads=32"]),
    ]
    for call, words in cases:
        assert_one_line(call(), capsys.readouterr().err, *words)
    ckpt = with_file(tiny_dir, tmp_path / "kv0", "params.json", {**PARAMS, "n_kv_heads": 0})
    code = convert.main([str(ckpt), str(tmp_path / "out"), "--to", "hf", "--dtype", "bfloat16"])
    assert_one_line(code, capsys.readouterr().err, "params.json", "'n_kv_heads' = 0")


def test_convert_accepts_both_dtype_spellings(tiny_dir, tmp_path):
    for i, name in enumerate(["bf16", "bfloat16"]):
        assert convert.main([str(tiny_dir), str(tmp_path / f"o{i}"), "--to", "meta", "--dtype", name]) == 0
        state = torch.load(tmp_path / f"o{i}" / "consolidated.00.pth", weights_only=True)
        assert state["tok_embeddings.weight"].dtype == torch.bfloat16


# ---------------------------------------------------------------------------- a bug is not a user error


def raise_bug(*args, **kwargs):
    raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x64 and 32x64)")


@pytest.mark.parametrize("cli", ["generate", "train", "convert", "data", "plan", "tokenizer"])
def test_a_genuine_bug_keeps_its_traceback(cli, monkeypatch, tmp_path, tiny_dir):
    from llama import generation

    calls = {
        "generate": (generation.Llama, "build", lambda: generate_cli.main(["--ckpt-dir", str(tiny_dir), "--prompt", "Hi"])),
        "train": (train_script, "setup", lambda: train_script.main([f"out_dir={tmp_path / 'o'}"])),
        "convert": (checkpoint, "load_model", lambda: convert.main([str(tiny_dir), str(tmp_path / "o"), "--to", "hf"])),
        "data": (data, "prepare", lambda: data.main(["prepare", "stdlib", "--out", str(tmp_path / "d"),
                                                     "--tokenizer", str(tiny_dir / "tokenizer.model")])),
        "plan": (plan, "make_plan", lambda: plan.main(["--model", "llama3.1-8b"])),
        "tokenizer": (tokenizer, "load_tokenizer", lambda: tokenizer.main(["encode", "--tokenizer", "x", "hi"])),
    }
    owner, name, call = calls[cli]
    monkeypatch.setattr(owner, name, staticmethod(raise_bug) if isinstance(owner, type) else raise_bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        call()


# ---------------------------------------------------------------------------- real processes


@pytest.mark.slow  # one fresh interpreter per CLI (importing torch: seconds each)
@pytest.mark.parametrize("cli", ["train", "generate", "convert", "data", "tokenizer", "plan"])
def test_real_process_one_line(cli, tiny_dir, tmp_path):
    args = {
        "train": ("train.py", "model.n_kv_heads=0", f"out_dir={tmp_path / 'o'}"),
        "generate": ("generate.py", "--prompt", "Hi", "--system", "Be brief."),
        "convert": ("llama.convert", with_file(tiny_dir, tmp_path / "c", "params.json", [1]), tmp_path / "o", "--to", "hf"),
        "data": ("llama.data", "prepare", tmp_path / "missing", "--out", tmp_path / "d"),
        "tokenizer": ("llama.tokenizer", "encode", "--tokenizer", tmp_path / "missing.model", "hi"),
        "plan": ("llama.plan", "--model", "llama3.1-8b", "--mp", "5"),
    }[cli]
    out = run(*args)
    assert_one_line(out.returncode, out.stderr)
    assert out.stdout == ""


@pytest.mark.slow
def test_torchrun_user_error_prints_once_and_every_rank_exits_1(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "train.py"),
         "model.n_kv_heads=0", f"out_dir={tmp_path / 'o'}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert out.returncode == 1
    ours = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert ours == ["error: config: 'model.n_kv_heads' = 0: must be positive: a divisor of n_heads "
                    "(leave it out for one K/V head per query head)"], out.stderr
    # no worker traceback: torchrun's own summary (unavoidable on a failure) quotes our line instead
    assert "llama/" not in out.stderr and "train.py\", line" not in out.stderr, out.stderr
    assert "(a user error: no traceback)" in out.stderr
