"""vLLM's arguments for a serving replica: its engine's and its OpenAI server's, from the serving config."""

import argparse
import json

from cluster.config import ServeConfig
from cluster.vllm_engine.tier import CONFIG_KEY, TierSpec

# A weak model fills the whitespace that JSON allows; constrained output is compact, as the API promises.
STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}
BLOCK_TOKENS = 16  # vLLM's CPU KV-cache block
LOST_REQUESTS = "cluster.vllm_engine.lost:LostRequests"  # finds the requests that needed a lost expert


def vllm_args(config: ServeConfig, model_dir: str, model_name: str, spec: TierSpec) -> argparse.Namespace:
    """The namespace vLLM's OpenAI server parses from its command line, with the engine's arguments in it."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from cluster.vllm_engine import tools

    argv = ["--model", model_dir, "--served-model-name", model_name, "--dtype", config.dtype,
            "--max-num-seqs", str(config.max_batch_size),
            "--additional-config", json.dumps({CONFIG_KEY: spec.data()}),
            "--structured-outputs-config", json.dumps(STRUCTURED_OUTPUTS),
            "--logits-processors", LOST_REQUESTS,
            "--enable-auto-tool-choice", "--tool-call-parser", tools.NAME,  # vLLM uses a parser only with both
            "--disable-uvicorn-access-log"]
    if config.kv_cache_tokens is not None:
        argv += ["--num-gpu-blocks-override", str(-(-config.kv_cache_tokens // BLOCK_TOKENS))]
    return make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
