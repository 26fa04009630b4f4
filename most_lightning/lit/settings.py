"""The LitModule's optimiser, schedule and evaluation settings, with their defaults defined here only.

``MoSTLitModule`` fills what a caller leaves out from these; Hydra composes the same values through the
``lit/base`` node (most_lightning/config_nodes.py), on which conf/lit/default.yaml builds.
"""

# AdamW as in the reference recipe (docs/model_spec.md section 5). The reference uses lr 1e-5..5e-5 on the
# pretrained backbone; a tiny model trained from scratch wants a much larger one. weight_decay applies to
# matrices only (not norms).
OPTIMIZER = dict(lr=2.0e-3, betas=[0.9, 0.95], eps=1.0e-8, weight_decay=0.0)
# linear warm-up, then linear decay to min_lr_ratio * lr at total_steps (None = trainer.max_steps)
SCHEDULER = dict(warmup_steps=50, min_lr_ratio=0.0, total_steps=None)
# asr_max_new_tokens: greedy ASR decoding budget per utterance (text tokens); n_asr_examples: (reference,
# hypothesis) pairs kept per ASR test set, written to asr_examples.json
EVALUATION = dict(asr_max_new_tokens=96, n_asr_examples=8)
