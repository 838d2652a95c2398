"""Train the embedded default model: a small Mixtral that writes Python, learned from the standard library's source.

The corpus is the running interpreter's own standard library (PSF licence), a fixed list of modules present in
CPython 3.10 to 3.13; the held-out files in cluster/demo/heldout are never trained on. Seeded: the same list, seed
and step count give the same weights on the same torch build.
"""

import json
import math
import platform
import sysconfig
import time
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

from cluster.demo_model import build_tokenizer

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
HELDOUT_DIR = DEMO_DIR / "heldout"
MODEL_DIR = DEMO_DIR / "model"

CORPUS_MODULES = tuple(sorted("""
_collections_abc _pyio _strptime _threading_local _weakrefset abc argparse ast base64 bdb bz2 cProfile calendar cmd
code codecs codeop compileall configparser contextlib contextvars copy copyreg csv dataclasses datetime decimal
difflib dis doctest enum filecmp fileinput fractions ftplib functools genericpath getopt getpass gettext glob gzip
hashlib heapq hmac imaplib inspect io ipaddress linecache locale lzma mailbox mimetypes modulefinder netrc ntpath
numbers operator optparse os pathlib pdb pickle pickletools pkgutil platform plistlib poplib posixpath pprint profile
pstats pty py_compile pyclbr queue quopri random reprlib rlcompleter runpy sched secrets selectors shelve shutil
signal site smtplib socket socketserver ssl stat statistics string struct subprocess symtable sysconfig tabnanny
tarfile tempfile textwrap threading timeit tokenize trace traceback tracemalloc tty turtle types typing uuid
warnings wave weakref webbrowser zipapp zipfile zipimport
asyncio/base_events asyncio/events asyncio/futures asyncio/locks asyncio/queues asyncio/streams asyncio/tasks
collections/__init__ concurrent/futures/_base concurrent/futures/process concurrent/futures/thread
email/_header_value_parser email/feedparser email/headerregistry email/message email/utils
http/client http/cookiejar http/cookies http/server json/__init__ json/decoder json/encoder
logging/__init__ logging/config logging/handlers multiprocessing/connection multiprocessing/managers
multiprocessing/pool unittest/case unittest/loader unittest/main unittest/mock unittest/result unittest/runner
urllib/parse urllib/request wsgiref/handlers wsgiref/simple_server xml/dom/minidom xml/etree/ElementTree
xmlrpc/client xmlrpc/server zoneinfo/_zoneinfo html/parser
""".split()))
HELDOUT_MODULES = ("bisect", "colorsys", "fnmatch", "graphlib", "shlex")

# 4 layers, 8 experts, top-2, hidden 256: every serving path of the random default applies, and the bfloat16
# weights stay under 25 MB.
SHAPE = dict(
    hidden_size=256, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024, sliding_window=None,
    tie_word_embeddings=False, initializer_range=0.02, rope_theta=10000.0,
)
VOCAB_SIZE = 4096
CONTEXT = 512
AUX_LOSS_COEF = 0.02
CALIBRATION_CHARS = 2048


def corpus_files(stdlib: str | None = None) -> list[Path]:
    """The training files that exist in this interpreter's standard library, in a fixed order."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    assert not set(CORPUS_MODULES) & set(HELDOUT_MODULES)
    return [p for p in (root / f"{name}.py" for name in CORPUS_MODULES) if p.is_file()]


def heldout_texts() -> dict[str, str]:
    """The held-out files shipped beside the model (copies of the standard library's, PSF licence)."""
    return {name: (HELDOUT_DIR / f"{name}.py.txt").read_text() for name in HELDOUT_MODULES}


def build_code_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE learned on the corpus, with the random default's special tokens and chat template."""
    return build_tokenizer(vocab_size, texts)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Every file as <s> text </s>, one after another."""
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids += [tokenizer.bos_token_id, *encoding.ids, tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def make_config(tokenizer) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, router_aux_loss_coef=AUX_LOSS_COEF, **SHAPE,
    )


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(out_dir: str | Path = MODEL_DIR, steps: int = 1000, batch: int = 8, context: int = CONTEXT,
          seed: int = 0, threads: int = 2, lr: float = 2e-3, log_every: int = 25, stdlib: str | None = None) -> dict:
    torch.set_num_threads(threads)
    started = time.perf_counter()
    files = corpus_files(stdlib)
    texts = [p.read_text(encoding="utf-8") for p in files]
    tokenizer = build_code_tokenizer(texts)
    stream = token_stream(tokenizer, texts)
    print(f"corpus: {len(files)} files, {sum(map(len, texts))} chars, {len(stream)} tokens", flush=True)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(make_config(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sampler = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - context - 1, (batch,), generator=sampler)
        ids = torch.stack([stream[s:s + context] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup=min(100, steps // 10 + 1))
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            elapsed = time.perf_counter() - started
            print(f"step {step} loss {out.loss.item():.3f} aux {out.aux_loss.item():.3f} "
                  f"elapsed {elapsed:.0f}s tok/s {(step + 1) * batch * context / elapsed:.0f}", flush=True)
    metrics = {"steps": steps, "batch": batch, "context": context, "seed": seed, "threads": threads, "lr": lr,
               "corpus_files": len(files), "corpus_tokens": len(stream),
               "train_seconds": round(time.perf_counter() - started), "torch": torch.__version__,
               "python": platform.python_version()}
    save(model.eval(), tokenizer, out_dir)
    return finish(out_dir, texts, stream, metrics)


def finish(out_dir: str | Path, texts: list[str], stream: torch.Tensor, metrics: dict) -> dict:
    """Measure the saved (bfloat16) model on the held-out files, fit its k-means routing centroids on training
    text, and record both beside the weights."""
    from cluster.tools.routing_report import calibrate

    out = Path(out_dir)
    metrics = {**metrics, **evaluate(out, stream)}
    calibrate(out, calibration_texts(texts))
    (out / "training.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def calibration_texts(texts: list[str] | None = None) -> list[str]:
    """What the k-means centroids are fitted on: the start of every fourth training file (never held-out text)."""
    texts = texts or [p.read_text(encoding="utf-8") for p in corpus_files()]
    return [text[:CALIBRATION_CHARS] for text in texts[::4]]


def evaluate(model_dir: Path, stream: torch.Tensor) -> dict:
    """Held-out perplexity of the model, and of a unigram model fitted on the training stream (add-one), on the
    same held-out windows as `moecluster routing-report`."""
    from cluster.tools.routing_report import windows

    model = MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    ids, _ = windows(tokenizer, list(heldout_texts().values()), None)
    counts = torch.bincount(stream, minlength=len(tokenizer)).double() + 1
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    targets = ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    unigram = -(counts / counts.sum()).log()[targets].mean()
    return {"heldout_perplexity": round(math.exp(float(nll)), 3), "unigram_perplexity": round(math.exp(float(unigram)), 3),
            "heldout_tokens": targets.numel()}


def save(model, tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def finish_run(out_dir: str | Path, stdlib: str | None = None, **metrics) -> dict:
    """`finish` for a model already trained and saved: the corpus read and tokenized again as training did."""
    texts = [p.read_text(encoding="utf-8") for p in corpus_files(stdlib)]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out_dir)
    return finish(out_dir, texts, token_stream(tokenizer, texts), metrics)
