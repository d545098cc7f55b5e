"""Official weights in and out: Meta (params.json + consolidated.NN.pth), Hugging Face
(config.json + safetensors) and llama.cpp GGUF, at any model-parallel size.

    load.py     load_model: detect the format, build on the meta device, assign this rank's shards
    meta.py     Meta's layout        hf.py   Hugging Face's layout      gguf.py   llama.cpp's GGUF
    convert.py  python -m llama.convert: between the formats
"""

from llama.checkpoint.common import CheckpointError, model_args_from_dict, params_dict, params_json
from llama.checkpoint.hf import save_hf
from llama.checkpoint.load import default_tokenizer_path, detect_format, load_model, read_model_args, resolve
from llama.checkpoint.meta import save_meta

__all__ = ["CheckpointError", "default_tokenizer_path", "detect_format", "load_model", "model_args_from_dict",
           "params_dict", "params_json", "read_model_args", "resolve", "save_hf", "save_meta"]
