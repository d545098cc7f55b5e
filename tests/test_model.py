"""llama/model.py against HF transformers' LlamaForCausalLM (the independent reference), plus the
properties a decoder must have: cache == full forward, causality, published parameter counts."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama.model import ModelArgs, Transformer, apply_rotary_emb, precompute_freqs_cis

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"


def tiny_args(**overrides) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                norm_eps=1e-5, rope_theta=10000.0, max_seq_len=128)
    return ModelArgs(**{**base, **overrides})


def build(args: ModelArgs, seed: int = 0) -> Transformer:
    model = Transformer(args)
    model.init_weights(seed)
    return model.eval()


def meta_to_hf_qk(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Meta pairs (x0,x1),(x2,x3).. -> HF's rotate-half halves (x0..x_{d/2-1}),(x_{d/2}..): written
    here independently of llama/checkpoint/load.py so the test checks the layout, not itself."""
    return w.view(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def hf_twin(model: Transformer):
    """The same weights in an HF LlamaForCausalLM."""
    transformers = pytest.importorskip("transformers")
    a = model.params
    rope = None
    if a.use_scaled_rope:
        rope = {"rope_type": "llama3", "factor": a.rope_scaling_factor, "low_freq_factor": a.rope_low_freq_factor,
                "high_freq_factor": a.rope_high_freq_factor,
                "original_max_position_embeddings": a.rope_original_max_seq_len}
    config = transformers.LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_hidden_dim,
        num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
        head_dim=a.head_dim, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, rope_scaling=rope,
        max_position_embeddings=max(a.max_seq_len, a.rope_original_max_seq_len + 1),
        tie_word_embeddings=a.tie_word_embeddings, attention_bias=False, mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    for i in range(a.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out[q + "self_attn.q_proj.weight"] = meta_to_hf_qk(sd[p + "attention.wq.weight"], a.n_heads, a.head_dim)
        out[q + "self_attn.k_proj.weight"] = meta_to_hf_qk(sd[p + "attention.wk.weight"], a.n_kv_heads, a.head_dim)
        out[q + "self_attn.v_proj.weight"] = sd[p + "attention.wv.weight"]
        out[q + "self_attn.o_proj.weight"] = sd[p + "attention.wo.weight"]
        out[q + "mlp.gate_proj.weight"] = sd[p + "feed_forward.w1.weight"]
        out[q + "mlp.up_proj.weight"] = sd[p + "feed_forward.w3.weight"]
        out[q + "mlp.down_proj.weight"] = sd[p + "feed_forward.w2.weight"]
        out[q + "input_layernorm.weight"] = sd[p + "attention_norm.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
    missing, unexpected = hf.load_state_dict(out, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf


def perturb_norms(model: Transformer, seed: int = 1) -> None:
    """init_weights sets norms to 1, which would hide a norm-weight mix-up; randomise them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(n_kv_heads=4), id="mha"),
        pytest.param(dict(n_kv_heads=2), id="gqa"),
        pytest.param(dict(n_kv_heads=1), id="mqa"),
        pytest.param(dict(tie_word_embeddings=True, n_kv_heads=2), id="tied"),
        pytest.param(dict(hidden_dim=80, ffn_dim_multiplier=None), id="explicit-ffn"),
        pytest.param(dict(use_scaled_rope=True, rope_theta=500000.0), id="scaled-rope"),
    ],
)
def test_logits_match_hf(overrides):
    model = build(tiny_args(**overrides))
    perturb_norms(model)
    hf = hf_twin(model)
    tokens = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.dtype == torch.float32 and ours.shape == (2, 48, 256)
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_scaled_rope_matches_hf_beyond_original_context(factor):
    """Llama 3.1 (factor 8) and 3.2 (factor 32) scaling on a sequence longer than 8192 tokens."""
    T = 8300
    args = tiny_args(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, max_seq_len=T,
                     use_scaled_rope=True, rope_scaling_factor=factor, rope_theta=500000.0)
    model = build(args)
    hf = hf_twin(model)
    tokens = torch.randint(0, 64, (1, T))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_rope_scaling_bands():
    """Short wavelengths untouched, long ones divided by the factor, a monotone ramp between."""
    from llama.model import rope_frequencies

    args = tiny_args(dim=256, n_heads=2, rope_theta=500000.0, use_scaled_rope=True)
    plain = rope_frequencies(tiny_args(dim=256, n_heads=2, rope_theta=500000.0))
    scaled = rope_frequencies(args)
    wavelen = 2 * torch.pi / plain
    short, long = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert short.any() and long.any() and (~short & ~long).any()
    torch.testing.assert_close(scaled[short], plain[short])
    torch.testing.assert_close(scaled[long], plain[long] / 8)
    ratio = (scaled / plain)[~short & ~long]
    assert ((ratio > 1 / 8) & (ratio < 1)).all() and (ratio.diff() <= 0).all()


def test_rope_is_a_rotation():
    """Rotating by position p then comparing q.k depends only on the offset (the point of RoPE)."""
    args = tiny_args(max_seq_len=64)
    freqs = precompute_freqs_cis(args)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    dots = [(apply_rotary_emb(q, freqs[p : p + 1]) * apply_rotary_emb(k, freqs[p + 5 : p + 6])).sum() for p in (0, 7, 30)]
    torch.testing.assert_close(torch.stack(dots), dots[0].expand(3), atol=1e-5, rtol=1e-5)
    assert torch.allclose(apply_rotary_emb(q, freqs[9:10]).norm(), q.norm())


def test_rotary_real_form_under_compile_equals_complex_form():
    """Under torch.compile apply_rotary_emb spells the complex product out in reals (inductor has
    no complex kernels); traced by dynamo (backend="eager"), it must give the eager complex result,
    for shared positions (T, Dh/2) and per-sequence ones (B, T, Dh/2)."""
    freqs = precompute_freqs_cis(tiny_args(max_seq_len=64))
    x = torch.randn(2, 5, 3, 16)
    traced = torch.compile(apply_rotary_emb, backend="eager", fullgraph=True)
    for f in (freqs[7:12], freqs[torch.tensor([[3], [40]]) + torch.arange(5)]):
        torch.testing.assert_close(traced(x, f), apply_rotary_emb(x, f), atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


def test_incremental_decoding_matches_full_forward():
    model = build(tiny_args())
    tokens = torch.randint(0, 256, (3, 40))
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache(3, 40)
        steps = [model(tokens[:, :16], 0, cache)] + [model(tokens[:, i : i + 1], i, cache) for i in range(16, 40)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
        # chunked prefill: uneven chunks that each continue the cache
        cache = model.make_cache(3, 40)
        chunks, pos = [], 0
        for size in (5, 11, 1, 23):
            chunks.append(model(tokens[:, pos : pos + size], pos, cache))
            pos += size
        torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)
        # last_only gives the final position's logits
        last = model(tokens, 0, model.make_cache(3, 40), last_only=True)
        torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)


def test_causality():
    model = build(tiny_args())
    tokens = torch.randint(0, 256, (1, 32))
    changed = tokens.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3


def test_no_causal_mask_materialised_without_cache(monkeypatch):
    """The training / no-cache path must pass is_causal=True, not a T x T mask."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = build(tiny_args())
    model(torch.randint(0, 256, (1, 64)))
    assert calls and all(mask is None and causal for mask, causal in calls)


def test_bf16_cast_keeps_rope_table():
    model = build(tiny_args())
    table = model.freqs_cis.clone()
    model.to(torch.bfloat16)
    assert model.freqs_cis.dtype == torch.complex64
    torch.testing.assert_close(model.freqs_cis, table)
    logits = model(torch.randint(0, 256, (1, 8)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_overlong_input_is_refused():
    model = build(tiny_args(max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


PUBLISHED = {
    "llama3-8b": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-70b": 70_553_706_496,
    "llama3.3-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_official_shapes_have_published_parameter_counts(name):
    params = json.loads((CONFIGS / f"{name}.json").read_text())
    with torch.device("meta"):
        model = Transformer(ModelArgs(**params))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


def test_meta_params_json_constructs_unchanged():
    """The exact params.json Meta ships for Llama 3.1 8B (plus the two sizing keys)."""
    meta = {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
            "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256}
    args = ModelArgs(**meta, max_seq_len=131072, max_batch_size=1)
    assert args.ffn_hidden_dim == 14336 and args.head_dim == 128


def test_state_dict_keys_are_metas():
    model = build(tiny_args(n_layers=1))
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"} | {
        f"layers.0.{k}.weight" for k in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                         "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                                         "attention_norm", "ffn_norm")}
    assert set(model.state_dict()) == expected
    Transformer(tiny_args(n_layers=1)).load_state_dict(model.state_dict(), strict=True)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = build(tiny_args(vocab_size=128)).train()
    tokens = torch.randint(0, 128, (4, 33))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(100):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
