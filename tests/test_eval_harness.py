"""Our evaluation against lm-evaluation-harness's own: lm-eval driving the `llama-ref` adapter reproduces our
scorer offline, and its `hf` backend and our adapter agree per request on the same SmolLM2 weights, for
each output type (multiple choice, rolling log-likelihood, generation)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from llama.eval import EvalError
from llama.eval.scoring import prefix_token
from tests.test_eval import ITEMS, ROOT, TEXT, run_cli, tiny_ckpts, write_jsonl  # noqa: F401 (tiny_ckpts: a fixture)

TASKS = {
    "ref_choice": """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
  - {metric: acc_bytes, aggregation: mean, higher_is_better: true}
""",
    "ref_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
""",
    "ref_gen": """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 5, do_sample: false, temperature: 0.0}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
""",
}
DOCS = ["A short note about the sea and the wind.", "The keeper climbed the stairs every night to light the lamp."]
GEN_PROMPTS = ["The capital of France is", "Once upon a time"]


def write_tasks(root: Path, gen_answers, docs=DOCS) -> Path:
    data = {"ref_choice": ITEMS, "ref_rolling": [{"text": t} for t in docs],
            "ref_gen": [{"prompt": p, "answer": a} for p, a in zip(GEN_PROMPTS, gen_answers)]}
    for name, body in TASKS.items():
        jsonl = write_jsonl(root / f"{name}.jsonl", data[name])
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {jsonl}\ntest_split: test\n"
        (root / f"{name}.yaml").write_text(head + body)
    return root


def harness_worker(ckpt: str, tok: str, root: str) -> None:
    """Run in a subprocess with the network disabled: lm-eval's numbers and ours, as JSON on stdout."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from llama.eval.choice import score_items
    from llama.eval.lm_eval_adapter import LlamaRefLM
    from llama.eval.perplexity import perplexity_of_tokens
    from llama.eval.scoring import greedy_completions
    from llama.generation import Llama

    llama = Llama.build(ckpt, tok, max_seq_len=64, max_batch_size=1)
    greedy = greedy_completions(llama, GEN_PROMPTS, 5, ["\n"])
    write_tasks(Path(root), [greedy[0], greedy[1] + " and more"])  # exact match: 1/2
    ours_choice = score_items(llama.model, llama.tokenizer, ITEMS, batch_size=2)
    nll = n_bytes = 0.0
    for doc in DOCS:  # one window each: lm-eval's rolling window == our strided window
        ids = [prefix_token(llama.tokenizer)] + llama.tokenizer.encode(doc, bos=False, eos=False)
        res = perplexity_of_tokens(llama.model, ids, len(doc.encode()), 64, 64)
        nll, n_bytes = nll + res.nll, n_bytes + res.bytes
    out = simple_evaluate(model=LlamaRefLM(llama=llama, batch_size=2), tasks=list(TASKS),
                          task_manager=TaskManager(include_path=root, include_defaults=False), log_samples=False)
    theirs = {name: {k.split(",")[0]: v for k, v in r.items() if "stderr" not in k and "," in k}
              for name, r in out["results"].items()}
    ours = {"ref_choice": {k: ours_choice[k] for k in ("acc", "acc_norm", "acc_bytes")},
            "ref_rolling": {"bits_per_byte": nll / n_bytes / math.log(2)}, "ref_gen": {"exact_match": 0.5}}
    print("RESULT " + json.dumps({"ours": ours, "theirs": theirs}))


def offline_env(tmp_path) -> dict:
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "ds"))
    # any connection that slips through goes to a closed local port and fails
    env.update(http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
    return env


@pytest.mark.slow  # a subprocess importing lm-eval and datasets: ~1-2 minutes on a busy 2-core machine
def test_lm_eval_reproduces_our_scorer_offline(tiny_ckpts, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'llama-ref[eval]'")
    (ckpt, _), tok = tiny_ckpts
    code = f"from tests.test_eval_harness import harness_worker; harness_worker({ckpt!r}, {tok!r}, {str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=offline_env(tmp_path), timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stderr[-3000:]
    result = json.loads(line[len("RESULT "):])
    for task, metrics in result["ours"].items():
        for name, value in metrics.items():
            assert result["theirs"][task][name] == pytest.approx(value, rel=1e-9, abs=1e-12), (task, name)


def samples_and_metrics(out) -> dict:
    """{task: (per-request responses by doc, metrics)} of a simple_evaluate result (log_samples=True)."""
    result = {}
    for task, samples in out["samples"].items():
        resps = {s["doc_id"]: [r[0] for r in s["resps"]] for s in samples}
        metrics = {k.split(",")[0]: v for k, v in out["results"][task].items() if "stderr" not in k and "," in k}
        result[task] = ([resps[i] for i in sorted(resps)], metrics)
    return result


def hf_and_ref_worker(gguf: str, hf_dir: str, root: str) -> None:
    """lm-eval 0.4.13 on the same SmolLM2 weights through its own `hf` model (HF transformers' conversion
    of the GGUF, HF's tokenizer as it comes) and through `llama-ref`; JSON on stdout."""
    import lm_eval.evaluator
    import lm_eval.models.huggingface  # noqa: F401  registers "hf" (lm-eval registers backends lazily)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm_eval.evaluator.add_env_info = lambda results: None  # torch's collect_env: seconds of subprocesses per run

    from llama.eval.choice import score_items
    from llama.eval.lm_eval_adapter import LlamaRefLM
    from llama.generation import Llama

    # 64-token windows: TEXT's ~90 tokens take two rolling windows; the generation context is cut
    # to 64 - 5 tokens, its start dropped, under both models.
    write_tasks(Path(root), [" Paris", " there was"], docs=[*DOCS, TEXT])
    kw = dict(tasks=list(TASKS), task_manager=TaskManager(include_path=root, include_defaults=False),
              log_samples=True)
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir}/model,tokenizer={hf_dir}/tokenizer,"
                             "dtype=float32,device=cpu,max_length=64", batch_size=1, **kw)
    llama = Llama.build(gguf, max_seq_len=64, max_batch_size=1, device="cpu")
    ours = simple_evaluate(model=LlamaRefLM(llama=llama, batch_size=4), **kw)
    choice = score_items(llama.model, llama.tokenizer, ITEMS, batch_size=4)
    print("RESULT " + json.dumps({"hf": samples_and_metrics(theirs), "ref": samples_and_metrics(ours),
                                  "choice": {k: choice[k] for k in ("acc", "acc_norm", "acc_bytes")}}))


@pytest.mark.slow  # a subprocess: lm-eval's import, SmolLM2 loaded by HF and by us (~40 s on 2 cores)
def test_lm_eval_hf_and_llama_ref_agree_per_request(smollm2_gguf, hf_smollm2_dir, tmp_path):
    """The same weights through lm-eval's `hf` model and through ours, on a task of each output type:
    every request's log-likelihood within 1e-4, the same generated text, the same metrics (accuracies
    exactly; perplexities, made of those log-likelihoods, within 1e-5); the `choice` command agrees."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'llama-ref[eval]'")
    code = (f"from tests.test_eval_harness import hf_and_ref_worker; "
            f"hf_and_ref_worker({str(smollm2_gguf)!r}, {str(hf_smollm2_dir)!r}, {str(tmp_path)!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=offline_env(tmp_path), timeout=900)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stderr[-3000:]
    result = json.loads(line[len("RESULT "):])
    hf, ref = result["hf"], result["ref"]
    assert sorted(hf) == sorted(ref) == sorted(TASKS)
    for task in TASKS:
        (hf_resps, hf_metrics), (ref_resps, ref_metrics) = hf[task], ref[task]
        assert len(hf_resps) == len(ref_resps) > 0
        for doc, (a, b) in enumerate(zip(hf_resps, ref_resps)):
            if task == "ref_gen":
                assert a == b, (doc, a, b)  # greedy, fp32, 5 tokens: a margin no CPU flips
                continue
            a = [x[0] if isinstance(x, list) else x for x in a]  # (loglikelihood, greedy) or a float
            b = [x[0] if isinstance(x, list) else x for x in b]
            assert b == pytest.approx(a, abs=1e-4, rel=0), (task, doc)
        assert sorted(hf_metrics) == sorted(ref_metrics)
        for name, value in hf_metrics.items():
            if name.startswith("acc") or name == "exact_match":
                assert ref_metrics[name] == value, (task, name)
            else:
                assert ref_metrics[name] == pytest.approx(value, rel=1e-5), (task, name)
    assert hf["ref_rolling"][0][-1][0] < -50  # TEXT, two windows: a real sum
    assert result["choice"] == {k: ref["ref_choice"][1][k] for k in ("acc", "acc_norm", "acc_bytes")}


@pytest.mark.slow  # lm_eval's CLI imports datasets, evaluate, ...
def test_lm_eval_unknown_model_arg_is_one_line(tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'llama-ref[eval]'")
    from llama.eval.lm_eval_adapter import LlamaRefLM

    with pytest.raises(EvalError, match="unknown llama-ref model arg.*adapters.*use ckpt_dir, lora"):
        LlamaRefLM.create_from_arg_string("ckpt_dir=x,adapters=adapter/")
    code, out, err = run_cli(["harness", "--model", "llama-ref", "--model_args", "colour=blue", "--tasks",
                              "ref_choice", "--include_path", write_tasks(tmp_path, ["a", "b"])], capsys)
    # lm-eval logs its own INFO lines first; ours is the last line, with no traceback
    assert code == 1 and err.splitlines()[-1].startswith("error: unknown llama-ref model arg(s) colour"), err
    assert "Traceback" not in err
    # lm-eval's other spelling (space-separated, short flag): refused the same way, before any task is read
    code, out, err = run_cli(["harness", "--model=llama-ref", "-a", "ckpt_dir=x", "colour=blue", "--tasks",
                              "no_such_task"], capsys)
    assert code == 1 and err.splitlines()[-1].startswith("error: unknown llama-ref model arg(s) colour"), err
