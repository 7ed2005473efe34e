"""What the PyTorch anchors of the training-step benchmarks share: timing a
step function as a training loop runs it, and writing the rows."""
import json
import sys
import time

import torch


def adamw(model):
    """AdamW(fused) as the trainer sets it up: weight decay 0.1 on matrices and
    embeddings, none on gains; betas (0.9, 0.95)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-5, betas=(0.9, 0.95), fused=True)


def time_steps(step, warmup, steps, tokens_per_step):
    """Runs `warmup` untimed steps (compilation included), then `steps` timed
    ones by wall clock (each reads its loss, as a training loop logs it).
    Returns the row's timing fields: tokens_per_step, tokens_per_s,
    ms_per_step, peak_gib, loss, warmup_s."""
    t0 = time.time()
    for _ in range(warmup):
        step()
    warm_s = time.time() - t0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    loss = None
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = time.time() - t0
    return {"tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_step * steps / seconds,
            "ms_per_step": 1e3 * seconds / steps,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": loss,
            "warmup_s": warm_s}


def record(rows, row, json_path):
    """Appends `row`, prints it on stderr and rewrites the JSON (a killed run
    keeps what it measured)."""
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": rows}, f, indent=2)
