"""vLLM's engine running the dense part of the model, with the routed experts on moecluster's expert tier.

`plugin.register` (vLLM's `vllm.general_plugins` entry point) swaps the unquantized experts method of every MoE layer
for `RemoteExperts` in engines started with a tier (`args.engine_args`); their experts are one call each,
`router.forward(layer, hidden, topk_ids, topk_weights)`, inside an opaque custom op (`tier.py`).
"""
