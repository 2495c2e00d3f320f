"""Training machinery of the `sft` and `dpo` stages, one job per module.

- config: TrainConfig (what both stages share) and the training errors;
- data: tokenized batch arrays, the seeded batch order, this process's share of a batch;
- logps: summed log-probs of the answer tokens (the vocabulary projection on those alone);
- schedule: learning-rate schedules and the optimizer;
- checkpoint: the run folder, checkpoints (adapter + optimizer state + data position), metric trimming;
- loop: the compiled training loop (the loss and the batches are arguments) and validation;
- fit: the whole run a stage starts: output, model, adapter, resume, start row, loop, summary.json.

Adapters (LoRA layers, adapter files) live in mlx_cai.adapters, the chat encoding in mlx_cai.encoding.
"""
