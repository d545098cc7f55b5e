"""bench/generate.py records what a speed claim needs to travel (a smoke run on SmolLM2, eager only)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_generate_bench_records_host_bandwidth_and_loaded_ratio(tmp_path, smollm2_gguf):
    out = tmp_path / "record.json"
    run = subprocess.run([sys.executable, "bench/generate.py", "--quick", "--skip", "hf", "llamacpp", "compile", "int8", "int4",
                          "--compete", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    host = record["host"]
    assert host["device"] and isinstance(host["cpu_flags"], list) and host["matvec_gbs"] > 0
    assert host["threads"] >= 1 and "OMP_WAIT_POLICY=PASSIVE" in host["policy"] and "torch" in host["versions"]
    assert host["revision"] != "unknown" and len(host["date"]) == 10  # a measurement keeps its code and date
    (row,) = [r for r in record["rows"] if r["engine"] == "llama-ref"]
    assert row["decode_tok_s"] > 0 and row["decode_loaded_tok_s"] > 0
    assert row["gbs"] == pytest.approx(row["mb_per_token"] / 1e3 * row["decode_tok_s"], rel=0.01)
    assert row["share_of_matvec"] == pytest.approx(row["gbs"] / host["matvec_gbs"], rel=0.02)
    assert row["loaded_over_quiet"] == pytest.approx(row["decode_loaded_tok_s"] / row["decode_tok_s"], rel=0.01)
    assert row["kernels"] == {}  # eager: nothing compiled (tests/test_fast.py checks a compiled record)
    assert "| llama-ref | fp32 |" in run.stdout  # the table


def test_llamacpp_without_repacking_reads_its_weights_from_the_mapped_file(smollm2_gguf):
    """bench/generate.py's LlamaCpp(repack=False), as `llama-cli --no-repack` (what a file larger than RAM
    needs: bench/synthetic.py --llamacpp-no-repack) loads and runs, the same greedy tokens as llama.cpp's
    default. (What it saves shows with Q4_0, which llama.cpp repacks on AVX2/AVX-512 CPUs: 8B's 4.2 GB
    of file became 8.1 GiB resident; docs/quantization.md.)"""
    import argparse
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import generate
    finally:
        sys.path.remove(str(ROOT / "bench"))
    args = argparse.Namespace(threads=1)
    prompt = [1, 504, 3458, 282, 4649, 314]
    default = generate.LlamaCpp(smollm2_gguf, args).decode(prompt, 6)[1]
    mapped = generate.LlamaCpp(smollm2_gguf, args, repack=False)
    assert mapped.decode(prompt, 6)[1] == default and len(default) == 6
