"""Quality of a quantized model against its base: perplexity, KL divergence of the
next-token distributions, top-1 agreement, all over the same token windows."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class EvalResult:
    tokens: int
    ppl_base: float
    ppl_quant: float | None = None
    kl: float | None = None  # mean KL(base || quant) per predicted token, nats
    top1_agreement: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [("tokens", f"{self.tokens}"), ("perplexity (base)", f"{self.ppl_base:.4f}")]
        if self.ppl_quant is not None:
            rows += [("perplexity (quantized)", f"{self.ppl_quant:.4f}"),
                     ("KL(base||quant) nats/token", f"{self.kl:.5f}"),
                     ("top-1 agreement", f"{100 * self.top1_agreement:.2f}%")]
        w = max(len(r[0]) for r in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probs [B, T-1, V], on the model's device (only sums leave it)."""
    out = model(input_ids=ids.to(_device(model)), use_cache=False).logits[:, :-1].float()
    return F.log_softmax(out, dim=-1)


@torch.no_grad()
def perplexity(model, batches, progress: bool = False) -> float:
    nll, n = 0.0, 0
    for ids in tqdm(batches, desc="perplexity", disable=not progress, unit="batch"):
        lp = _logprobs(model, ids)
        tgt = ids[:, 1:].to(lp.device)
        nll -= lp.gather(-1, tgt.unsqueeze(-1)).sum().item()
        n += tgt.numel()
    return math.exp(nll / n)


@torch.no_grad()
def compare(base, quant, batches, progress: bool = False) -> EvalResult:
    """Both models over the same batches of input_ids [B, T]."""
    nll_b = nll_q = kl = 0.0
    agree = n = 0
    for ids in tqdm(batches, desc="evaluating", disable=not progress, unit="batch"):
        lb = _logprobs(base, ids)
        lq = _logprobs(quant, ids).to(lb.device)
        tgt = ids[:, 1:].unsqueeze(-1).to(lb.device)
        nll_b -= lb.gather(-1, tgt).sum().item()
        nll_q -= lq.gather(-1, tgt).sum().item()
        kl += (lb.exp() * (lb - lq)).sum().item()
        agree += (lb.argmax(-1) == lq.argmax(-1)).sum().item()
        n += tgt.numel()
    return EvalResult(n, math.exp(nll_b / n), math.exp(nll_q / n), kl / n, agree / n)
