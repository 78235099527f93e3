"""Picking the next token on the device, shared by the torch kernels (lab.engines.torch_common) and the Triton
ones (lab.engines.fused): greedy, or seeded top-k sampling that can run inside a CUDA graph."""
from __future__ import annotations

import torch


def pick(logits: torch.Tensor, temperature: float, top_k: int, uniform: torch.Tensor | None) -> torch.Tensor:
    """Next token ids on the device: argmax when temperature is 0, else top-k sampling by the Gumbel-max trick
    with `uniform`, draws in (0, 1) shaped like `logits`. The caller draws them from the request's seeded
    generator; taking them as an input keeps this function free of RNG state, so it can run inside a CUDA graph
    (a graph replays the random numbers it captured unless they are fed in).

    `temperature` may be a (rows, 1) tensor, one per stream of a batch (lab/engines/csm_batched.py): a row at 0
    stays greedy (its logits are only scaled up, which keeps their argmax, and get no noise)."""
    if isinstance(temperature, torch.Tensor):
        scaled = logits.float() / temperature.clamp(min=1e-5)
        if top_k:
            kth = torch.topk(scaled, min(top_k, scaled.shape[-1]), dim=-1).values[..., -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1 - 1e-7)))
        return (scaled + gumbel * (temperature > 0)).argmax(-1)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # argmax(logits + Gumbel noise) is a draw from softmax(logits): the same distribution as multinomial.
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1 - 1e-7)))
    return (logits + gumbel).argmax(-1)
