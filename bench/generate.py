"""Generation speed, side by side in one run: llama-ref vs HF transformers vs llama.cpp.

    flock /tmp/llama-bench.lock python bench/generate.py            # the docs/performance.md table (~10 min on 2 cores)
    python bench/generate.py --new-tokens 32 --skip hf               # quicker
    python bench/generate.py --device cuda                           # GPU: llama-ref and HF only

Setup: SmolLM2-135M-Instruct (the weights in llama.assets, dequantized once to fp32, so every
engine runs the very same numbers), greedy, batch 1, `--threads` CPU threads for everyone.
- prefill: a 512-token prompt, time until the first new token (tokens/s = 512 / time);
- decode: 128 new tokens after a short prompt (stop tokens ignored), tokens/s over the steps
  after the first token. Each number is the best of `--repeat` runs (the machine is shared).
- bandwidth: weight bytes read per decoded token x tokens/s, against the bandwidth of a large fp32
  matrix-vector product measured here (what a perfect decoder would reach).

Peers:
- HF transformers `generate()`, fp32, loading the same GGUF;
- llama.cpp through llama-cpp-python, `pip install llama-cpp-python` (builds llama.cpp from source,
  about an hour on 2 cores). Its F32 and Q8_0 files are made by its own quantize function
  (`llama_model_quantize`) from an F32 GGUF that this script writes from the same weights. If it
  is not installed, its rows are skipped with a message.
llama-ref runs fp32 and weight-only int8 (--quantize int8), each eager and with torch.compile
(--compile: max-autotune + freezing on CPU, a few minutes of compiling per engine before timing).
"""

import argparse
import ctypes
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from llama.assets import cache_dir, smollm2_gguf
from llama.quantize import DEFAULT_GROUP_SIZE

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


def llamacpp_quantize(src: Path, dst: Path, ftype_name: str, threads: int) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize), e.g. LLAMA_FTYPE_MOSTLY_Q8_0."""
    import llama_cpp

    if not dst.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, ftype_name)
        params.nthread = threads
        if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize failed for {dst}")
    return dst


def matvec_bandwidth(device: str, repeat: int = 20) -> float:
    """GB/s of y = W x with a 256 MB fp32 W: the memory-bound kernel a decoder is made of."""
    w = torch.randn(8192, 8192, device=device)
    x = torch.randn(8192, 1, device=device)
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        (w @ x).sum().item()
        best = min(best, time.perf_counter() - start)
    return w.numel() * 4 / best / 1e9


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def decode_bytes_ours(model) -> int:
    """Bytes one decode step reads: every matrix and norm; the embedding table only if untied."""
    seen, total = set(), 0
    output = getattr(model.output, "weight", None)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name == "freqs_cis" or t.data_ptr() in seen:
            continue
        if name == "tok_embeddings.weight" and t is not output:  # a lookup reads B rows, not the table
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------- engines
# Each engine: .prefill(ids) -> seconds to the first new token; .decode(ids, n) -> (seconds for
# the n - 1 tokens after the first, tokens); .bytes = weight bytes one decode step reads.


class Ours:
    def __init__(self, path, args, quantize=None, compile=False, group_size=None):
        from llama.fast import keep_freed_memory
        from llama.generation import Llama

        keep_freed_memory()  # as generate.py does: the allocator setting is opt-in
        self.llama = Llama.build(path, max_seq_len=1024, max_batch_size=1, device=args.device, compile=compile,
                                 quantize=quantize, group_size=group_size)
        self.llama.tokenizer.stop_tokens = set()  # always n tokens, like min_new_tokens / ignore_eos
        self.bytes = decode_bytes_ours(self.llama.model)

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
    def __init__(self, path, args):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_ubatch=512,
                                   n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
        self.bytes = Path(path).stat().st_size  # the file is the weights (+ ~2 MB of vocabulary)

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


def versions() -> str:
    out = [f"torch {torch.__version__}"]
    for name in ("transformers", "llama_cpp"):
        try:
            out.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return ", ".join(out)


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip", nargs="*", default=[], choices=["hf", "llamacpp", "compile", "int8", "int4"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    src = smollm2_gguf()
    from llama.tokenizer import load_tokenizer

    tok = load_tokenizer(src)
    text = (PROMPT + " ") * 200
    prompt_512 = tok.encode(text, bos=False, eos=False)[:512]
    prompt_short = tok.encode(PROMPT, bos=False, eos=False)
    device = args.device
    on_gpu = device.startswith("cuda")
    bw = matvec_bandwidth(device)
    print(f"{torch.cuda.get_device_name() if on_gpu else cpu_name()}, {args.threads} threads; "
          f"{versions()}; fp32 matvec {bw:.1f} GB/s", flush=True)
    engines = {("llama-ref", "fp32"): lambda: Ours(src, args)}
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
                path = cache_dir() / f"smollm2-135m-instruct.llamacpp-{weights}.gguf"
                llamacpp_quantize(f32, path, ftype, args.threads)
                engines[("llama.cpp (llama-cpp-python)", weights)] = lambda path=path: LlamaCpp(path, args)
    built = {}
    for key, make in engines.items():
        built[key] = engine = make()
        # Warm-up (compile, thread pools): a compiled engine compiles its decode step once, for
        # every cache length.
        engine.prefill(prompt_512), engine.decode(prompt_short, 8)
    # Interleaved repeats, best of each: load from other users hits every engine alike.
    best = {key: [0.0, 0.0] for key in built}
    tokens = {}
    for r in range(args.repeat):
        for key, engine in built.items():
            best[key][0] = max(best[key][0], len(prompt_512) / engine.prefill(prompt_512))
            seconds, tokens[key] = engine.decode(prompt_short, args.new_tokens)
            best[key][1] = max(best[key][1], (args.new_tokens - 1) / seconds)
        print(f"round {r + 1}: " + "; ".join(f"{k[0]} {k[1]} {v[1]:.1f} tok/s" for k, v in best.items()), flush=True)
    rows = [(key[0], key[1], best[key][0], best[key][1], built[key].bytes) for key in built]
    reference = tokens[("llama-ref", "fp32")]
    for key, toks in tokens.items():
        same = next((i for i, (a, b) in enumerate(zip(toks, reference)) if a != b), len(reference))
        print(f"{key[0]} {key[1]}: the first {same}/{len(reference)} greedy tokens equal llama-ref fp32's")
    print()
    print(f"| engine | weights | prefill 512 (tok/s) | decode (tok/s) | MB read/token | GB/s | % of matvec {bw:.1f} GB/s |")
    print("|---|---|---|---|---|---|---|")
    for engine, weights, prefill, decode, nbytes in rows:
        gbs = nbytes * decode / 1e9
        print(f"| {engine} | {weights} | {prefill:.0f} | {decode:.1f} | {nbytes / 1e6:.0f} | {gbs:.1f} | {100 * gbs / bw:.0f}% |")
    ratios(rows)
    return 0


def ratios(rows) -> None:
    """The targets: decode >= 1.15x llama.cpp F32 and >= 2x HF; prefill >= 1.5x llama.cpp F32;
    quantized decode >= 1.0x llama.cpp's Q8_0 (int8) and Q4_0 (int4), compiled."""
    by = {(engine, weights): (prefill, decode) for engine, weights, prefill, decode, _ in rows}
    ours, cpp = by.get(("llama-ref", "fp32")), by.get(("llama.cpp (llama-cpp-python)", "F32"))
    pairs = [("decode vs llama.cpp F32", ours, cpp, 1), ("prefill vs llama.cpp F32", ours, cpp, 0),
             ("decode vs HF", ours, by.get(("HF transformers generate()", "fp32")), 1)]
    compiled = by.get(("llama-ref + torch.compile", "fp32"))
    if compiled:
        pairs[1:1] = [("compiled decode vs llama.cpp F32", compiled, cpp, 1),
                      ("compiled prefill vs llama.cpp F32", compiled, cpp, 0),
                      ("compiled decode vs HF", compiled, by.get(("HF transformers generate()", "fp32")), 1)]
    for method, group, weights in QUANTIZED:
        peer = by.get(("llama.cpp (llama-cpp-python)", "Q8_0" if method == "int8" else "Q4_0"))
        name = "Q8_0" if method == "int8" else "Q4_0"
        for suffix, label in (("", ""), (" + torch.compile", "compiled ")):
            ours_q = by.get((f"llama-ref --quantize {method} --group-size {group}{suffix}", weights))
            pairs += [(f"{label}{weights} {what} vs llama.cpp {name}", ours_q, peer, i)
                      for what, i in (("decode", 1), ("prefill", 0))]
    for what, a, b, i in pairs:
        if a and b:
            print(f"{what}: {a[i] / b[i]:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
