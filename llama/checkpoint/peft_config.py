"""What an adapter_config.json may say: the options of PEFT's LoraConfig (peft 0.21) this project
implements, as an allowlist, and what they mean for a merge.

A key that is not in `CONFIG_RULES` is refused: a newer PEFT option may change the math (activated
LoRA's `alora_invocation_tokens` leaves the base untouched before its invocation tokens; merged as
plain LoRA it would be silently wrong), and so is a listed key with a value outside its rule, in
one line naming the key. Implemented: plain LoRA, rsLoRA's alpha/sqrt(r), `rank_pattern` and
`alpha_pattern` (PEFT's matching rule, `module_scales`), and the keys that only choose which
modules are adapted (`target_modules`, `exclude_modules`, `layers_to_transform`), which
llama/checkpoint/peft.py checks against the tensors present (`selected`). Metadata and settings
only initialisation or training reads pass as they are.
"""

import math
import re
from typing import Dict, Optional

from llama.checkpoint.hf import hf_name
from llama.lora import LoRAError

# Meta's projection names -> the module names in HF's LlamaForCausalLM (and so in PEFT's keys).
HF_MODULES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
              "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rank(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _unset(v) -> bool:
    return v is None or v is False or v == {} or v == [] or v == ""


def _index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _layers(v) -> bool:
    return v is None or _index(v) or (isinstance(v, list) and all(map(_index, v)))


def _regex(v) -> bool:
    try:
        return isinstance(v, str) and re.compile(v) is not None
    except re.error:
        return False


def _pattern(check):
    return lambda v: v is None or (isinstance(v, dict) and all(_regex(k) and check(x) for k, x in v.items()))


def _modules(v) -> bool:
    """PEFT's module selectors: a regex (matched in full) or a list of names or dotted suffixes."""
    return v is None or _regex(v) or (isinstance(v, list) and all(isinstance(t, str) for t in v))


def _targets(v) -> bool:
    """Selectors that can only pick the seven projections: a list naming them (PEFT saves
    'all-linear' as the list of full names), 'all-linear', or a regex (the tensors are checked)."""
    return _modules(v) and not (isinstance(v, list) and any(t.rsplit(".", 1)[-1] not in HF_MODULES.values()
                                                            for t in v))


_ANY = lambda v: True  # noqa: E731  metadata, or a setting only initialisation or training reads
_POSITIVE = lambda v: _number(v) and v > 0  # noqa: E731
CONFIG_RULES = {
    "peft_type": (lambda v: v == "LORA", "only LoRA adapters load here"),
    "task_type": (lambda v: v in (None, "CAUSAL_LM"), "only CAUSAL_LM adapters of a Llama load here"),
    "r": (_rank, "must be a positive integer"),
    "lora_alpha": (_POSITIVE, "must be a positive finite number"),
    "lora_dropout": (lambda v: v is None or (_number(v) and 0 <= v < 1), "must be in [0, 1)"),
    "use_rslora": (lambda v: isinstance(v, bool), "must be true or false"),
    "rank_pattern": (_pattern(_rank), "must map module patterns to positive integer ranks"),
    "alpha_pattern": (_pattern(_POSITIVE), "must map module patterns to positive finite alphas"),
    "target_modules": (_targets, f"only the seven projections load here ({', '.join(HF_MODULES.values())})"),
    "exclude_modules": (_modules, "must be a regex or a list of module names"),
    "layers_to_transform": (_layers, "must be a layer index or a list of them"),
    "init_lora_weights": (lambda v: v in (True, False, "gaussian", "orthogonal", "eva"),
                          "that initialisation changes the base weights or the layer (PiSSA, OLoRA, CorDA, "
                          "LoftQ, LoRA-GA, MiCA): save the adapter converted to plain LoRA with peft"),
    "fan_in_fan_out": (lambda v: v is False, "Conv1D-style (transposed) weights are not Llama's"),
    "bias": (lambda v: v == "none", "trained biases are not supported: Llama has no biases"),
    **{key: (_unset, f"{what} is not supported: only plain per-projection LoRA loads here") for key, what in {
        "use_dora": "DoRA", "alora_invocation_tokens": "activated LoRA (aLoRA)", "use_qalora": "QA-LoRA",
        "arrow_config": "Arrow routing", "lora_bias": "a LoRA bias", "modules_to_save": "training whole modules",
        "trainable_token_indices": "training token embeddings", "target_parameters": "LoRA on parameters",
        "layer_replication": "layer replication", "megatron_config": "Megatron layers", "use_bdlora": "BD-LoRA",
        "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA",
        "enable_lora": "the old merged-QKV LoRA"}.items()},
    **{key: (_ANY, "") for key in (
        "peft_version", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "runtime_config",
        "layers_pattern", "megatron_core", "qalora_group_size", "ensure_weight_tying",
        "loftq_config", "eva_config", "corda_config", "lora_ga_config", "merge_weights")},
}


def check_config(config: dict, file) -> None:
    """Refuse, in one line naming the key, anything in adapter_config.json this loader does not
    implement or a value out of range (CONFIG_RULES)."""
    if not isinstance(config, dict):
        raise LoRAError(f"{file}: not a PEFT LoRA config (a JSON object with peft_type, r, lora_alpha)")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise LoRAError(f"{file}: not a PEFT LoRA config (no {key})")
    for key, value in config.items():
        if key not in CONFIG_RULES:
            raise LoRAError(f"{file}: {key}={value!r} is not an option this loader implements (plain LoRA as of "
                            f"peft 0.21): merge it with peft instead")
        accept, why = CONFIG_RULES[key]
        if not accept(value):
            raise LoRAError(f"{file}: {key}={value!r}: {why}")


def _pattern_key(patterns, module: str) -> Optional[str]:
    """PEFT's rule for rank_pattern / alpha_pattern: the first pattern that matches the module's full
    name or a dotted suffix of it."""
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", module)), None)


def scale(config: dict, r: int, alpha: float) -> float:
    return alpha / (r ** 0.5 if config.get("use_rslora") else r)  # rsLoRA: alpha / sqrt(r)


def module_scales(config: dict, modules) -> Dict[str, tuple]:
    """(rank, scale) of each adapted module (Meta name 'layers.0.attention.wq'): r and lora_alpha,
    or their rank_pattern / alpha_pattern entry for the module's HF name."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    out = {}
    for name in modules:
        hf = hf_name(f"{name}.weight").removesuffix(".weight")  # model.layers.0.self_attn.q_proj
        r = ranks.get(_pattern_key(ranks, hf), config["r"])
        alpha = alphas.get(_pattern_key(alphas, hf), config["lora_alpha"])
        out[name] = (r, scale(config, r, alpha))
    return out


def selected(selector, module: str, default: bool) -> bool:
    """Does PEFT's `selector` pick `module` ('model.layers.0.self_attn.q_proj')? (None: `default`)"""
    if selector is None or selector == "all-linear":
        return default if selector is None else True
    if isinstance(selector, str):
        return re.fullmatch(selector, module) is not None
    return any(module == t or module.endswith("." + t) for t in selector)
