"""Generation speed, side by side in one run: llama-ref vs HF transformers vs llama.cpp.

    flock /tmp/llama-bench.lock python bench/generate.py --repeat 4 --compete 1 --json out.json
    python bench/generate.py --new-tokens 32 --skip hf               # quicker
    python bench/generate.py --device cuda                           # GPU: llama-ref and HF only

Setup: SmolLM2-135M-Instruct (the weights in llama.common.assets, dequantized once to fp32, so every
engine runs the very same numbers), greedy, batch 1, `--threads` CPU threads for everyone
(default: the CPUs this process may use), OpenMP threads waiting as generate.py's do
(llama/common/threads.py; set OMP_WAIT_POLICY or GOMP_SPINCOUNT yourself to compare).
- prefill: a 512-token prompt, time until the first new token (tokens/s = 512 / time);
- decode: 128 new tokens after a short prompt (stop tokens ignored), tokens/s over the steps
  after the first token. Each number is the best of `--repeat` rounds (the machine is shared).
- bandwidth: weight bytes read per decoded token x tokens/s, and its share of the bandwidth of a
  large fp32 matrix-vector product measured here (what a perfect decoder would reach).
- `--compete N`: N busy-looping processes run during a second decode of every engine in every
  round (paused otherwise), and each engine's loaded/quiet ratio is reported: how well it shares
  the CPU.
What a claim needs to travel is printed first and written by `--json`: the CPU, its vector flags,
threads and wait policy, versions, the measured bandwidth, and for each compiled engine the
kernel inductor took for each product shape.

Peers:
- HF transformers `generate()`, fp32, loading the same GGUF;
- llama.cpp through llama-cpp-python, `pip install llama-cpp-python` (builds llama.cpp from source,
  about an hour on 2 cores). Its F32, Q8_0 and Q4_0 files are made by its own quantize function
  (`llama_model_quantize`) from an F32 GGUF that this script writes from the same weights. If it
  is not installed, its rows are skipped with a message.
llama-ref runs fp32, int8 (group 64 and per row) and int4 (group 32), each eager and with torch.compile
(--compile: C++ GEMM templates + freezing on CPU, a minute or two of compiling per engine).
"""

import argparse
import json
import sys
import time
import unittest.mock
import warnings
from pathlib import Path

from llama.common.threads import describe as thread_policy, set_wait_policy, usable_cpus

set_wait_policy()  # before torch loads OpenMP: wait as generate.py does (llama/common/threads.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llama.common.assets import cache_dir, smollm2_gguf  # noqa: E402
from llama.common.files import write_text  # noqa: E402
from llama.generation.quantize import DEFAULT_GROUP_SIZE  # noqa: E402

from _host import Competitor, host_facts, matvec_bandwidth, sync  # noqa: E402  (bench/_host.py)
from _synthetic import llamacpp_quantize  # noqa: E402  (bench/_synthetic.py)

PROMPT = "The history of the Roman Empire begins"
# llama-ref's quantized engines: (scheme, group size, weights column); group 0 = one int8 scale per row
QUANTIZED = [("int8", DEFAULT_GROUP_SIZE["int8"], f"int8 group {DEFAULT_GROUP_SIZE['int8']}"),
             ("int8", 0, "int8 per row"), ("int4", DEFAULT_GROUP_SIZE["int4"], f"int4 group {DEFAULT_GROUP_SIZE['int4']}")]


def write_f32_gguf(src: Path, dst: Path) -> Path:
    """Copy a GGUF with every tensor dequantized to F32 (same metadata, same tensor names)."""
    import gguf

    if dst.exists():
        return dst
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst) + ".partial", arch=reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = 0 if key == "general.file_type" else field.contents()  # 0: LLAMA_FTYPE_ALL_F32
        kind = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[-1]) if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, kind, sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(dst) + ".partial").rename(dst)
    return dst


def decode_bytes_ours(model) -> int:
    """Bytes one decode step reads: every matrix and norm; the embedding table only if untied."""
    seen, total = set(), 0
    output = getattr(model.output, "weight", None)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name == "freqs_cis" or t.data_ptr() in seen:
            continue
        if name.startswith("tok_embeddings.") and t is not output:  # a lookup reads B rows, not the table
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer (quantized codes, scales), the RoPE table excepted."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return sum(t.numel() * t.element_size() for name, t in {t.data_ptr(): (n, t) for n, t in named}.values()
               if not name.endswith("freqs_cis"))


# ---------------------------------------------------------------------------- engines
# Each engine: .prefill(ids) -> seconds to the first new token; .decode(ids, n) -> (seconds for
# the n - 1 tokens after the first, tokens); .bytes = weight bytes one decode step reads.


class Ours:
    def __init__(self, path, args, quantize=None, compile=False, group_size=None, dtype=None):
        from llama.generation.compile import keep_freed_memory
        from llama.generation import Llama

        keep_freed_memory()  # as generate.py does: the allocator setting is opt-in
        self.llama = Llama.build(path, max_seq_len=1024, max_batch_size=1, device=args.device, compile=compile,
                                 quantize=quantize, group_size=group_size, dtype=dtype)
        self.llama.tokenizer.stop_tokens = set()  # always n tokens, like min_new_tokens / ignore_eos
        self.bytes = decode_bytes_ours(self.llama.model)
        self.weights = weight_bytes(self.llama.model)

    def prefill(self, ids):
        self.llama.generate([ids], 1, temperature=0)
        return self.llama.stats.time_to_first_token_s

    def decode(self, ids, n):
        tokens, _ = self.llama.generate([ids], n, temperature=0)
        return (n - 1) / self.llama.stats.decode_tokens_per_s, tokens[0]  # compiled: the first step is timed apart


class HF:
    def __init__(self, path, args):
        import transformers
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32).to(args.device).eval()
        self.device = args.device
        self.bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())  # tied: counted once

    def _generate(self, ids, n):
        sync(self.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids], device=self.device), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, top_p=None, top_k=None, pad_token_id=0)
        sync(self.device)
        return time.perf_counter() - start, out[0, len(ids):].tolist()

    def prefill(self, ids):
        return self._generate(ids, 1)[0]

    def decode(self, ids, n):
        first, _ = self._generate(ids, 1)  # generate() has no per-token clock: subtract a 1-token run
        total, tokens = self._generate(ids, n)
        return total - first, tokens


class LlamaCpp:
    def __init__(self, path, args, repack: bool = True):
        """repack=False: as `llama-cli --no-repack`, the weights stay in the mapped file (by default
        llama.cpp copies Q4_0/Q8_0 into its CPU's "extra" buffer layouts: a second copy in memory)."""
        import llama_cpp
        import llama_cpp.llama_cpp as capi

        defaults = capi.llama_model_default_params

        def no_repack():
            params = defaults()
            params.use_extra_bufts = False
            return params

        with unittest.mock.patch.object(capi, "llama_model_default_params", defaults if repack else no_repack):
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_ubatch=512,
                                       n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
        self.bytes = self.weights = Path(path).stat().st_size  # the file is the weights (+ a few MB of vocabulary)

    def _greedy(self, ids, n):
        """Wall clock, as for the other engines (llama-cpp-python's per-call Python is small
        next to a step of a 135M model)."""
        llm = self.llm
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        out = [self._argmax()]
        first = time.perf_counter()
        while len(out) < n:
            llm.eval([out[-1]])
            out.append(self._argmax())
        return first - start, time.perf_counter() - first, out

    def _argmax(self) -> int:
        # eval() computes only the last position's logits and leaves them in the context
        return int(np.argmax(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))))

    def prefill(self, ids):
        return self._greedy(ids, 1)[0]

    def decode(self, ids, n):
        return self._greedy(ids, n)[1:]


# ---------------------------------------------------------------------------- report


def compiled_kernels(engine) -> dict:
    """product shape -> kernel inductor took (llama/generation/compile.py KernelRecord); {} if not compiled."""
    llama = getattr(engine, "llama", None)
    return dict(getattr(getattr(llama, "_decode", None), "kernels", {}) or {})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Threads: " + thread_policy() + " (llama/common/threads.py).")
    p.add_argument("--threads", type=int, default=usable_cpus(), help="default: the CPUs this process may use")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip", nargs="*", default=[], choices=["hf", "llamacpp", "compile", "fp32", "int8", "int4"],
                   help="fp32: the fp32 engines (ours and llama.cpp F32): a quantized-only run")
    p.add_argument("--compete", type=int, default=0, metavar="N",
                   help="also decode with N busy-looping processes running, and report loaded/quiet")
    p.add_argument("--json", type=Path, help="write the record (host facts, kernels, rows, ratios) here")
    p.add_argument("--quick", action="store_true", help="a smoke run: 8 new tokens, 32-token prefill, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.prefill_tokens, args.repeat = 8, 32, 1
    torch.set_num_threads(args.threads)
    # Lower every compiled graph here instead of loading it from inductor's cache, so that the
    # kernels it chooses are recorded (the C++ it generates is still cached).
    torch._inductor.config.fx_graph_cache = False
    src = smollm2_gguf()
    from llama.tokenizer import load_tokenizer

    tok = load_tokenizer(src)
    text = (PROMPT + " ") * 200
    prompt_long = tok.encode(text, bos=False, eos=False)[:args.prefill_tokens]
    prompt_short = tok.encode(PROMPT, bos=False, eos=False)
    device = args.device
    on_gpu = device.startswith("cuda")
    host = host_facts(device, args.threads, matvec_bandwidth(device))
    print("; ".join(f"{k} {v}" for k, v in host.items()), flush=True)
    bw = host["matvec_gbs"]
    engines = {}
    if "fp32" not in args.skip:
        engines[("llama-ref", "fp32")] = lambda: Ours(src, args)
        if "compile" not in args.skip:
            engines[("llama-ref + torch.compile", "fp32")] = lambda: Ours(src, args, compile=True)
    for method, group, weights in QUANTIZED:
        if method not in args.skip:
            flags = f"--quantize {method} --group-size {group}"
            engines[(f"llama-ref {flags}", weights)] = lambda m=method, g=group: Ours(src, args, m, group_size=g)
            if "compile" not in args.skip:
                engines[(f"llama-ref {flags} + torch.compile", weights)] = \
                    lambda m=method, g=group: Ours(src, args, m, compile=True, group_size=g)
    if "hf" not in args.skip:
        engines[("HF transformers generate()", "fp32")] = lambda: HF(src, args)
    if "llamacpp" not in args.skip and not on_gpu:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama.cpp skipped: `pip install llama-cpp-python` to include it (builds from source)")
        else:
            f32 = write_f32_gguf(src, cache_dir() / "smollm2-135m-instruct.f32.gguf")
            for weights, ftype in (("F32", "LLAMA_FTYPE_ALL_F32"), ("Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"),
                                   ("Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0")):
                if weights == "F32" and "fp32" in args.skip:
                    continue
                path = cache_dir() / f"smollm2-135m-instruct.llamacpp-{weights}.gguf"
                llamacpp_quantize(f32, path, ftype, args.threads)
                engines[("llama.cpp (llama-cpp-python)", weights)] = lambda path=path: LlamaCpp(path, args)
    competitor = Competitor(args.compete) if args.compete else None
    try:
        built, best, tokens = measure(engines, args, prompt_long, prompt_short, competitor)
    finally:
        if competitor:
            competitor.close()
    rows = [{"engine": key[0], "weights": key[1], "prefill_tok_s": round(best[key]["prefill"], 1),
             "decode_tok_s": round(best[key]["decode"], 2), "mb_per_token": round(built[key].bytes / 1e6, 1),
             "gbs": round(built[key].bytes * best[key]["decode"] / 1e9, 2),
             "share_of_matvec": round(built[key].bytes * best[key]["decode"] / 1e9 / bw, 3),
             "kernels": compiled_kernels(built[key])} for key in built]
    for row, key in zip(rows, built):
        if competitor:
            row["decode_loaded_tok_s"] = round(best[key]["loaded"], 2)
            row["loaded_over_quiet"] = round(best[key]["loaded"] / best[key]["decode"], 3)
    reference = tokens.get(("llama-ref", "fp32"), [])
    for key, toks in tokens.items() if reference else ():
        same = next((i for i, (a, b) in enumerate(zip(toks, reference)) if a != b), len(reference))
        print(f"{key[0]} {key[1]}: the first {same}/{len(reference)} greedy tokens equal llama-ref fp32's")
    print_table(rows, host, args)
    record = {"host": host, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
              "ratios": ratios(rows)}
    if args.json:
        write_text(args.json, json.dumps(record, indent=1) + "\n")
    return 0


def measure(engines, args, prompt_long, prompt_short, competitor):
    """Build and warm every engine, then interleaved rounds, best of each (load from other users
    hits every engine alike); with a competitor, a second decode per round with it running."""
    built = {}
    for key, make in engines.items():
        built[key] = engine = make()
        # Warm-up (compile, thread pools): a compiled engine compiles its decode step once, for
        # every cache length.
        engine.prefill(prompt_long), engine.decode(prompt_short, 8)
    best = {key: {"prefill": 0.0, "decode": 0.0, "loaded": 0.0} for key in built}
    tokens = {}
    steps = args.new_tokens - 1
    for r in range(args.repeat):
        for key, engine in built.items():
            best[key]["prefill"] = max(best[key]["prefill"], len(prompt_long) / engine.prefill(prompt_long))
            seconds, tokens[key] = engine.decode(prompt_short, args.new_tokens)
            best[key]["decode"] = max(best[key]["decode"], steps / seconds)
            if competitor:
                with competitor.running():
                    seconds, _ = engine.decode(prompt_short, args.new_tokens)
                best[key]["loaded"] = max(best[key]["loaded"], steps / seconds)
        print(f"round {r + 1}: " + "; ".join(
            f"{k[0]} {k[1]} {v['decode']:.1f}" + (f" ({v['loaded']:.1f} loaded)" if competitor else "") + " tok/s"
            for k, v in best.items()), flush=True)
    return built, best, tokens


def print_table(rows, host, args) -> None:
    bw, loaded = host["matvec_gbs"], args.compete > 0
    extra = f" decode with {args.compete} busy (tok/s) | loaded/quiet |" if loaded else ""
    print(f"\n| engine | weights | prefill {args.prefill_tokens} (tok/s) | decode (tok/s) | MB read/token | GB/s "
          f"| % of matvec {bw:.1f} GB/s |{extra}")
    print("|---" * (9 if loaded else 7) + "|")
    for r in rows:
        cells = [r["engine"], r["weights"], f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}",
                 f"{r['mb_per_token']:.0f}", f"{r['gbs']:.1f}", f"{100 * r['share_of_matvec']:.0f}%"]
        if loaded:
            cells += [f"{r['decode_loaded_tok_s']:.1f}", f"{r['loaded_over_quiet']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    for r in rows:
        if r["kernels"]:
            print(f"\n{r['engine']} {r['weights']}: kernels by product (M x K -> N):")
            for shape, kernel in r["kernels"].items():
                print(f"  {shape}: {kernel}")
    print()
    for what, value in ratios(rows).items():
        print(f"{what}: {value:.2f}x")


CPP = "llama.cpp (llama-cpp-python)"


def ratios(rows) -> dict:
    """The targets: compiled fp32 decode >= 0.9x llama.cpp F32; prefill >= 1.3x llama.cpp F32;
    compiled quantized decode >= 1.0x llama.cpp's Q8_0 (int8) and Q4_0 (int4); under competition,
    our loaded/quiet >= 0.8x llama.cpp's."""
    by = {(r["engine"], r["weights"]): r for r in rows}
    cpp, hf = by.get((CPP, "F32")), by.get(("HF transformers generate()", "fp32"))
    eager, compiled = by.get(("llama-ref", "fp32")), by.get(("llama-ref + torch.compile", "fp32"))
    pairs = [("decode vs llama.cpp F32", eager, cpp, "decode_tok_s"),
             ("compiled decode vs llama.cpp F32", compiled, cpp, "decode_tok_s"),
             ("prefill vs llama.cpp F32", eager, cpp, "prefill_tok_s"),
             ("compiled decode vs HF", compiled, hf, "decode_tok_s"),
             ("decode vs HF", eager, hf, "decode_tok_s"),
             ("loaded/quiet: compiled vs llama.cpp F32", compiled, cpp, "loaded_over_quiet"),
             ("loaded/quiet: eager vs llama.cpp F32", eager, cpp, "loaded_over_quiet")]
    for method, group, weights in QUANTIZED:
        name = "Q8_0" if method == "int8" else "Q4_0"
        peer = by.get((CPP, name))
        for suffix, label in (("", ""), (" + torch.compile", "compiled ")):
            ours = by.get((f"llama-ref --quantize {method} --group-size {group}{suffix}", weights))
            pairs += [(f"{label}{weights} decode vs llama.cpp {name}", ours, peer, "decode_tok_s"),
                      (f"{label}{weights} prefill vs llama.cpp {name}", ours, peer, "prefill_tok_s"),
                      (f"loaded/quiet: {label}{weights} vs llama.cpp {name}", ours, peer, "loaded_over_quiet")]
    return {what: round(a[field] / b[field], 3) for what, a, b, field in pairs
            if a and b and a.get(field) and b.get(field)}


if __name__ == "__main__":
    sys.exit(main())
