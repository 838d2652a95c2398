"""The embedded default model, and small random-weight checkpoints in Hugging Face format for tests."""

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PreTrainedTokenizerFast

from experts.families import ARCHS, demo_config_kwargs

DEFAULT_ARCH = "mixtral"
# Shipped in the package: trained by `moecluster train-demo` (cluster/tools/train_demo.py), never made at start-up.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "demo" / "model"
# The trained default's shape (its vocabulary aside), for a random-weight Mixtral of its size: init_model(dir,
# DEFAULT_ARCH, **DEFAULT_SHAPE).
DEFAULT_SHAPE = dict(
    hidden_size=256, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
    max_position_embeddings=1024, initializer_range=0.05,
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
# Each message as "<|role|>" and its content, ended by the end-of-sequence token; then the assistant's turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = """\
Mixture-of-experts models replace each dense feed-forward layer with many experts and a learned router.
The router sends every token to a few experts, so only a fraction of the weights work on each token.
Serving them well means placing experts across machines, batching tokens by expert, and balancing load.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Hello, world! How are you today? I am a small language model with random weights, so I speak nonsense.
0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' " @ # $ % ^ & _ | ~ `
"""


def build_tokenizer(vocab_size: int = 512, texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (unset: an embedded corpus): deterministic, it encodes any text,
    with the special tokens and chat template of every moecluster-made model."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts if texts is not None else CORPUS.splitlines() * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def init_model(out_dir: str | Path, arch: str, seed: int = 0, **shape) -> Path:
    """Write a random-weight `arch` checkpoint (config.json, model.safetensors, tokenizer.json) to `out_dir`."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    tokenizer = build_tokenizer()
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    config = CONFIG_MAPPING[arch](**demo_config_kwargs(arch, len(tokenizer), **ids, **shape))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_zero_biases(model)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _randomize_zero_biases(model) -> None:
    # Routing biases start at zero; random ones make the demo exercise them (DeepSeek's score correction,
    # GPT-OSS's router and expert biases).
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("e_score_correction_bias", "router.bias", "_proj_bias")):
                tensor.normal_(0.0, 0.1)


def cache_dir() -> Path:
    """Where moecluster keeps what it makes once and reuses: the test tools' environment."""
    return Path(os.environ.get("MOECLUSTER_CACHE", Path.home() / ".cache" / "moecluster"))


def default_model_dir() -> Path:
    """The embedded default model: a Mixtral trained on the Python standard library, shipped in the package."""
    if not (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"{DEFAULT_MODEL_DIR}: the embedded model's weights are missing; "
                                "`moecluster train-demo` makes them, or pass --model DIR")
    return DEFAULT_MODEL_DIR
