"""LoRA adapters in PEFT's format: the way people share them, and what `peft` loads as it is.

    adapter_dir/
      adapter_config.json        PEFT's: peft_type LORA, r, lora_alpha, target_modules (q_proj ...)
      adapter_model.safetensors  full (unsharded) fp32 tensors under HF names:
                                 base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight ...
      lora.json                  ours, beside them: the base the adapter was trained on (path and
                                 the sha256 of its params), so a mismatch is caught by name

HF stores q/k weights in the rotate-half RoPE layout (llama/checkpoint/hf.py). B A lives in the same
output space as W, so the q/k `lora_B` rows take the same per-head permutation as W's rows (A,
acting on the input, is unchanged); every other tensor is stored as it is.

Reading an adapter goes through an allowlist (`CONFIG_RULES`): every option of peft 0.21's
LoraConfig with the values implemented here (plain LoRA, rsLoRA's alpha/sqrt(r), rank_pattern and
alpha_pattern, layers_to_transform); any other key or value, and a non-finite number in the config
or the tensors, is refused in one line naming it.

Merging (`merge_adapter`) reads the full tensors, cuts this rank's shard of each by
`parallel.SHARD_DIM` and adds (alpha/r) B A to the local weight: no communication, any
model-parallel size, K/V heads duplicated past n_kv_heads ranks like the weights are.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch

from llama import parallel
from llama.checkpoint.common import CheckpointError, params_dict
from llama.checkpoint.hf import from_rotate_half, hf_name, meta_name, to_rotate_half
from llama.checkpoint.load import resolve
from llama.checkpoint.peft_config import HF_MODULES, check_config, module_scales, scale, selected
from llama.common.files import write_bytes, write_text
from llama.lora import MODULES, TARGETS, LoRAError, check_targets, projection_shapes

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_POINTER = "lora.json"
PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> LlamaForCausalLM
ROTATED = ("attention.wq.lora_B.weight", "attention.wk.lora_B.weight")


def params_sha256(args) -> str:
    """A fingerprint of the base's shape (its params.json content), format-independent."""
    return hashlib.sha256(json.dumps(params_dict(args), sort_keys=True).encode()).hexdigest()


def _weight_name(lora_name: str) -> str:
    return lora_name.replace(".lora_A.", ".").replace(".lora_B.", ".")


def peft_key(name: str) -> str:
    """'layers.0.attention.wq.lora_A.weight' -> 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'."""
    part = "lora_A" if ".lora_A." in name else "lora_B"
    return PREFIX + hf_name(_weight_name(name)).replace(".weight", f".{part}.weight")


def lora_key(key: str) -> Optional[str]:
    """The inverse of peft_key; None for a key that is not a LoRA A/B of a Llama projection."""
    if not key.startswith(PREFIX):
        return None
    for part in ("lora_A", "lora_B"):
        marker = f".{part}.weight"
        if key.endswith(marker):
            base = meta_name(key[len(PREFIX):-len(marker)] + ".weight")
            if any(base.endswith(f".{m}.weight") for m in MODULES.values()):
                return base.replace(".weight", marker)
    return None


# ---------------------------------------------------------------------------- writing


def save_peft(out_dir, tensors: Dict[str, torch.Tensor], args, rank: int, alpha: float, dropout: float,
              targets, base: dict) -> None:
    """Write adapter_config.json + adapter_model.safetensors + lora.json from full Meta-keyed tensors."""
    from safetensors.torch import save as safetensors_bytes

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = {}
    for name, t in tensors.items():
        t = t.detach().float().cpu()
        if name.endswith(ROTATED):
            t = to_rotate_half(t, args.head_dim)
        hf[peft_key(name)] = t.contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base.get("path"),
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none",
        "target_modules": [HF_MODULES[t] for t in check_targets(targets)], "use_dora": False,
        "use_rslora": False, "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
    }
    blob = safetensors_bytes(hf, metadata={"format": "pt"})
    write_bytes(out_dir / ADAPTER_WEIGHTS, blob)
    for name, content in ((ADAPTER_CONFIG, config), (BASE_POINTER, base)):
        write_text(out_dir / name, json.dumps(content, indent=2) + "\n")


# ---------------------------------------------------------------------------- reading


@dataclass
class Adapter:
    path: Path
    rank: int
    alpha: float
    scale: float
    targets: list
    tensors: Dict[str, torch.Tensor]  # full, Meta keys, Meta's RoPE layout
    base: dict = field(default_factory=dict)  # lora.json, when the adapter was made here
    modules: Dict[str, tuple] = field(default_factory=dict)  # 'layers.0.attention.wq' -> (rank, scale)


def find_adapter(path) -> Path:
    """An adapter dir: a PEFT dir, a step dir of a LoRA run, or the run's out_dir (its `latest`)."""
    path = Path(path)
    if path.is_dir() and not (path / ADAPTER_CONFIG).is_file() and (path / "latest").is_file():
        try:
            path = resolve(path)
        except CheckpointError as e:
            raise LoRAError(str(e)) from None
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise LoRAError(f"--lora {path}: no {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS} there: give a PEFT adapter "
                        f"directory or a checkpoint of a LoRA training run")
    return path


def recorded_base(path) -> Optional[str]:
    """The base recorded by a LoRA training checkpoint (or its run's out_dir), else None."""
    path = Path(path)
    if path.is_dir() and (path / "latest").is_file() and not (path / BASE_POINTER).is_file():
        try:
            path = resolve(path)
        except CheckpointError:
            return None
    if not (path / BASE_POINTER).is_file() or not (path / ADAPTER_CONFIG).is_file():
        return None
    base = json.loads((path / BASE_POINTER).read_text()).get("path")
    if base is None:
        raise LoRAError(f"{path} holds LoRA adapters trained on a randomly initialised base (no base files): "
                        f"there is nothing to load them into")
    return base


def _check_tensors(tensors: Dict[str, torch.Tensor], config: dict, file: Path) -> None:
    """The tensors against the keys that choose what is adapted (PEFT would not have made others),
    and every number finite."""
    layers = config.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    for name, t in tensors.items():
        module = hf_name(_weight_name(name)).removesuffix(".weight")
        if not selected(config.get("target_modules"), module, True) or selected(
                config.get("exclude_modules"), module, False) or layers is not None and int(name.split(".")[1]) not in layers:
            raise LoRAError(f"{file}: {peft_key(name)} is a module the config's target_modules / exclude_modules / "
                            f"layers_to_transform leave out: the adapter is inconsistent")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise LoRAError(f"{file}: {peft_key(name)} holds non-finite or non-float values ({t.dtype}): "
                            f"the adapter is corrupt")


def read_adapter(path, args, base_label) -> Adapter:
    """The adapter at `path`, checked against the base (`args`, named `base_label` in errors), with
    its tensors full, under Meta keys, in Meta's RoPE layout."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = find_adapter(path)
    cfg_file = path / ADAPTER_CONFIG
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAError(f"{cfg_file}: not a PEFT LoRA config ({e})") from None
    check_config(config, cfg_file)
    try:
        raw = load_file(str(path / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise LoRAError(f"{path / ADAPTER_WEIGHTS}: corrupt or truncated ({e})") from None
    tensors = {}
    for key, t in raw.items():
        name = lora_key(key)
        if name is None:
            raise LoRAError(f"{path / ADAPTER_WEIGHTS}: tensor {key} is not a LoRA A/B of a Llama projection: "
                            f"unsupported adapter")
        tensors[name] = t
    if not tensors:
        raise LoRAError(f"{path / ADAPTER_WEIGHTS}: holds no LoRA tensors")
    _check_tensors(tensors, config, path / ADAPTER_WEIGHTS)
    tensors = {name: t.float() for name, t in tensors.items()}
    base = json.loads((path / BASE_POINTER).read_text()) if (path / BASE_POINTER).is_file() else {}
    r, alpha = config["r"], config["lora_alpha"]
    found = sorted({n.split(".")[-3] for n in tensors}, key=TARGETS.index)
    modules = sorted({n.rsplit(".", 2)[0] for n in tensors})
    adapter = Adapter(path, r, alpha, scale(config, r, alpha), found, tensors, base, module_scales(config, modules))
    check_fits(adapter, args, base_label)
    for name in tensors:
        if name.endswith(ROTATED):  # shapes checked: whole heads
            tensors[name] = from_rotate_half(tensors[name], args.head_dim)
    return adapter


def check_fits(adapter: Adapter, args, base_label) -> None:
    """Every tensor's shape against the base's projection; the base fingerprint when recorded."""
    want = params_sha256(args)
    recorded = adapter.base.get("params_sha256")
    if recorded and recorded != want:
        raise LoRAError(f"adapter {adapter.path} was trained on {adapter.base.get('path')} (params sha256 "
                        f"{recorded[:12]}), which does not match the base {base_label} (params sha256 {want[:12]})")
    shapes = projection_shapes(args)
    for name, t in adapter.tensors.items():
        layer, target = int(name.split(".")[1]), name.split(".")[-3]
        out, inp = shapes[target]
        rank = adapter.modules[name.rsplit(".", 2)[0]][0]
        expected = (rank, inp) if ".lora_A." in name else (out, rank)
        if layer >= args.n_layers or tuple(t.shape) != expected:
            raise LoRAError(f"adapter {adapter.path}: {peft_key(name)} has shape {tuple(t.shape)}, but the base "
                            f"{base_label} ({args.n_layers} layers) needs {expected}: the adapter was made for "
                            f"another model")
        partner = name.replace(".lora_A.", ".lora_B.") if ".lora_A." in name else name.replace(".lora_B.", ".lora_A.")
        if partner not in adapter.tensors:
            raise LoRAError(f"adapter {adapter.path}: {peft_key(name)} has no matching {peft_key(partner)}")


# ---------------------------------------------------------------------------- merging


@torch.no_grad()
def merge_adapter(model, path, base_label) -> Adapter:
    """W += scale * B A for every adapted projection of this rank's shard of `model`."""
    adapter = read_adapter(path, model.params, base_label)
    for name, a in adapter.tensors.items():
        if ".lora_A." not in name:
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        weight = model.get_parameter(_weight_name(name))
        local_a = parallel.shard(name, a).to(weight.device)
        # past n_kv_heads ranks, wk/wv B rows follow the weights' K/V-head rule (duplicated heads)
        local_b = parallel.shard(b_name, adapter.tensors[b_name], n_kv_heads=model.params.n_kv_heads).to(weight.device)
        delta = adapter.modules[name.rsplit(".", 2)[0]][1] * (local_b @ local_a)
        weight.copy_((weight.float() + delta).to(weight.dtype))
    return adapter


def export_training_adapter(local: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Full adapter tensors gathered from every model-parallel rank's shard (a collective):
    `local` is this rank's (llama.lora.adapter_state, or the FSDP pieces gathered first)."""
    return {n: parallel.gather(n, t) for n, t in local.items()}
