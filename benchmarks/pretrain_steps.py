"""Seconds per pretraining step of the default recipe's memory (random tokens, 12 steps), for comparing
allocator settings: `python benchmarks/pretrain_steps.py SLOTS` under /usr/bin/time, with and without
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_TOP_PAD_ (docs/internals.md "Session 9")."""

import sys
import time

import torch

from memlm.modeling import MemoryLMForCausalLM
from memlm.presets import preset_with
from memlm.training import Optimizers, clip_grad_norm

size = sys.argv[1]
p = preset_with(
    "default",
    [
        f"memory_size={size}",
        "sparse_values=true",
        "memory_query_bn=true",
        "memory_query_norm=false",
        "memory_layer=3",
    ],
)
torch.manual_seed(0)
torch.set_num_threads(2)
cfg = p.model_config()
cfg.vocab_size = 8192
model = MemoryLMForCausalLM(cfg)
opt = Optimizers(model, p)
model.train()
x = torch.randint(0, 8192, (p.batch_size, p.seq_len))
t0 = time.perf_counter()
for _step in range(12):
    loss = model(input_ids=x, labels=x).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    clip_grad_norm(model.parameters(), p.grad_clip)
    opt.step()
print(
    f"size {size} batch {p.batch_size}x{p.seq_len}: {(time.perf_counter() - t0) / 12:.2f} s/step, loss {loss.item():.3f}"
)
