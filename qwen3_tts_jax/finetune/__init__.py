"""Fine-tuning of Base checkpoints (the official `finetuning/` recipe in JAX, and past it: several
speakers in one run, LoRA adapters, a held-out loss).

    qwen3-tts-jax prepare-data --model BASE --input train_raw.jsonl --output train_with_codes.jsonl
    qwen3-tts-jax finetune --init-model BASE --train-jsonl train_with_codes.jsonl --output out \\
        --speaker-name my_voice

- `data.py`: the JSONL files (official format), audio -> codes, the official batch layout;
- `train.py`: the pure training step (loss, gradients, AdamW with clipping and accumulation),
  the training loop with checkpoints and resume, data parallel over local devices;
- `export.py`: a CustomVoice checkpoint in the official layout that both loaders read, and
  `merge-adapter` (a LoRA adapter merged into its base, `..lora`);
- `plot.py`: the loss curves of OUTPUT/metrics.jsonl as a PNG;
- `cli.py`: the subcommands prepare-data, finetune, merge-adapter.

See docs/finetuning.md for what is computed and where it departs from the official script.
"""
