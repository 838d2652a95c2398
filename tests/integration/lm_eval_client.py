"""Run by test_tools.py with the tools venv's Python: lm-eval's `local-completions` model, built as the harness
builds it (its default request bodies), scores (context, continuation) pairs and generates until stop strings
against a served model. Prints, as JSON, its answers and the token ids it sent, for the test's oracle.

Argument: a JSON object with base_url, model, tokenizer, batch_size, pairs, contexts, until, max_gen_toks.
"""

import json
import sys

from lm_eval.api.instance import Instance
from lm_eval.models.openai_completions import LocalCompletionsAPI


def main(job: dict) -> dict:
    lm = LocalCompletionsAPI(base_url=job["base_url"], model=job["model"], tokenizer=job["tokenizer"],
                             batch_size=job["batch_size"])
    pairs = [tuple(pair) for pair in job["pairs"]]
    scored = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    asked = {"until": job["until"], "max_gen_toks": job["max_gen_toks"]}
    generated = lm.generate_until([Instance("generate_until", {}, (context, dict(asked)), i)
                                   for i, context in enumerate(job["contexts"])])
    return {"scored": scored, "pairs": [lm._encode_pair(*pair) for pair in pairs], "generated": generated,
            "contexts": [lm.tok_encode(context) for context in job["contexts"]], "eos": lm.tokenizer.eos_token}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
