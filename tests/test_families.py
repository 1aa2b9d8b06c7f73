"""Every model family splitkit knows, as a tiny random model saved to a folder and loaded by path:
split logits equal the unsplit model's, and full / full+trunk LoRA gradients equal the unsplit
model's over a real ZeroMQ socket."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from splitkit import Learner, LoraSpec, load_model, split_model
from splitkit.core.models import ModelUnavailable
from splitkit.core.split import FAMILIES, layer_type
from splitkit.training.testing import random_batch, reference_grads

from .test_gradients import assert_grads_match

VOCAB = 259
SIZE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=1)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SIZE),
    "qwen2": lambda: Qwen2Config(**SIZE, use_sliding_window=True, sliding_window=4, max_window_layers=3),
    "qwen3": lambda: Qwen3Config(**SIZE, head_dim=16),
    "mistral": lambda: MistralConfig(**SIZE, sliding_window=4),
    "gemma2": lambda: Gemma2Config(**SIZE, head_dim=16, sliding_window=4, final_logit_softcapping=5.0),
    "gemma3_text": lambda: Gemma3TextConfig(**SIZE, head_dim=16, sliding_window=4, sliding_window_pattern=2),
    "phi3": lambda: Phi3Config(**SIZE),
    "gpt_neox": lambda: GPTNeoXConfig(**{k: v for k, v in SIZE.items() if k != "num_key_value_heads"},
                                      hidden_dropout=0.0, attention_dropout=0.0),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=6, n_head=4, n_positions=128,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, eos_token_id=1),
}
CUTS = (2, 4)


def save_tokenizer(folder):
    """A tokenizer of single letters, saved as tokenizer.json: what any folder loaded by path needs."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{chr(97 + i): 3 + i for i in range(26)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                            eos_token="</s>").save_pretrained(folder)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    """(family, folder): a tiny random model of the family, saved with save_pretrained, with a tokenizer."""
    torch.manual_seed(0)
    config = CONFIGS[request.param]()
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return request.param, str(folder)


def test_every_known_family_is_tested():
    assert set(CONFIGS) == set(FAMILIES)


def test_split_logits_equal_the_unsplit_models(saved):
    family, folder = saved
    model, tokenizer = load_model(folder)
    assert model.config.model_type == family and model.config.name_or_path == folder
    ids = random_batch(VOCAB, batch=2, seq=12)["input_ids"]
    bottom, trunk, top = split_model(model, CUTS)
    with torch.no_grad():
        split, unsplit = top(trunk(bottom(ids))), model(input_ids=ids).logits
    assert torch.allclose(split, unsplit, rtol=1e-5, atol=1e-5), f"largest difference {(split - unsplit).abs().max()}"


@pytest.mark.parametrize("mode", ["full", "full+trunk"])
def test_lora_gradients_equal_the_unsplit_models_over_a_socket(saved, serve, mode):
    _, folder = saved
    model, _ = load_model(folder)
    spec = LoraSpec(r=4, lora_alpha=8, init_b=0.02, seed=3)
    batch = random_batch(VOCAB, batch=2, seq=12)
    address = serve(model, CUTS)
    with Learner(model, mode=mode, cuts=CUTS, address=address, lora=spec) as learner:
        start = learner.lora_state()  # in full+trunk the Trunk's is the server's, from a seed of its own
        learner.forward_backward(batch)
        got = learner.lora_grads()
        if mode == "full+trunk":
            got.update(serve.servers[-1].sessions.lora_grads(learner.client.session))
    assert_grads_match(got, reference_grads(model, CUTS, spec, batch, train_trunk=mode == "full+trunk", start=start))


def test_sliding_window_layers_are_cut_with_their_own_mask():
    config = CONFIGS["gemma2"]()
    kinds = {layer_type(config, i) for i in range(config.num_hidden_layers)}
    assert kinds == {"full_attention", "sliding_attention"}


def test_an_unknown_family_is_refused_with_the_known_ones(tmp_path):
    from transformers import BloomConfig

    bloom = BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=2)
    AutoModelForCausalLM.from_config(bloom).save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    with pytest.raises(TypeError, match=r"splitkit knows the model families llama, qwen2, .*gpt2, not 'bloom'"):
        load_model(str(tmp_path))


def test_a_hub_id_that_is_not_cached_fails_at_once_and_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable, match=r"not in this machine's Hugging Face cache.*hf download Qwen/Qwen2\.5"):
        load_model("Qwen/Qwen2.5-0.5B")
