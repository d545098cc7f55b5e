"""Preference tuning: DPO, IPO and SimPO on pairs of replies (llama/data/pairs.py), as TRL computes them.

A pair is a prompt x with a chosen reply y_w and a rejected one y_l. A reply's log-probability
log pi(y | x) is the sum over its tokens of log p(token | everything before it): the negated
per-token cross-entropy, which under model parallelism comes from each rank's vocabulary slice of
the logits (llama/parallel/loss.py), never the gathered (tokens, vocab) tensor. With the reference
model's log ref(y | x) and d = log pi - log ref (the implicit reward is beta * d):

    DPO    (Rafailov et al., 2023)  -log sigmoid(beta * (d_w - d_l))
    IPO    (Azar et al., 2023)      (d_w / |y_w| - d_l / |y_l| - 1 / (2 beta))^2    (TRL's per-token d)
    SimPO  (Meng et al., 2024)      -log sigmoid(beta * (log pi(y_w) / |y_w| - log pi(y_l) / |y_l|) - gamma)

SimPO needs no reference. The loss of a step is the mean over the pairs of its global batch, so
gradient accumulation and data parallelism give the single-process value (llama/train/loop.py).
`dpo_sft_weight` > 0 adds that weight times the chosen replies' negative log-likelihood, averaged
over their tokens in the global batch (RPO, Pang et al., 2024; TRL: loss_type [..., "sft"] with
loss_weights, and CPO's cpo_alpha for SimPO): DPO alone may lower the chosen replies' likelihood
along with the rejected ones', so that the model prefers the right answer without writing it.

The reference is the frozen starting model. With LoRA it is the same weights with the adapters
off (`lora.disabled`): no second copy. Without LoRA it is a frozen copy of the starting weights,
made before the policy is distributed and sharded like it (FSDP over the data-parallel group, the
model-parallel split of its layers), stored in the compute dtype. A copy rather than reference
log-probabilities computed in one pass before training (TRL's precompute_ref_log_probs): a resumed
run rebuilds it from init_from exactly as LoRA rebuilds its base, nothing has to be stored or
looked up by pair, and it costs one no-grad forward per step, the same forward LoRA's reference
takes, plus the weights once more in the compute dtype (divided over the data-parallel ranks
under FSDP).

Metrics, under TRL's names: rewards/chosen and rewards/rejected (beta * d; SimPO: beta times the
average log-probability), rewards/accuracies (chosen reward > rejected), rewards/margins,
logps/chosen and logps/rejected (SimPO: per-token averages), each a mean over the step's pairs;
evaluation adds the same with an eval_ prefix.
"""

import copy
import functools
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from llama import lora
from llama.train import fsdp
from llama.train.batches import IGNORE
from llama.train.loop import dp_all_reduce, head_loss
from llama.train.setup import compute_dtype

NAMES = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"]


def response_logps(forward, inputs: torch.Tensor, targets: torch.Tensor, chunks: int = 1
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p over each row's trained targets (R,), their number (R,)) for inputs/targets (R, T):
    the training loss's head (llama/train/loop.py's head_loss) per row, inside the model's forward, from
    each rank's vocabulary slice of the logits; chunks > 1 (loss_chunks) as for the next-token loss."""
    nll = forward(inputs, head=functools.partial(head_loss, targets=targets, chunks=chunks, per_row=True))  # (R,)
    return -nll, (targets != IGNORE).sum(dim=1)


def preference_loss(kind: str, beta: float, gamma: float, logps: torch.Tensor, counts: torch.Tensor,
                    ref_logps: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per-pair losses (P,), statistics (5, P) in NAMES' order) from the rows' log-probabilities
    (2P,): the P chosen replies, then the P rejected ones (llama/train/batches.py's layout). A pair
    with no trained token is held-out padding (every real reply has at least its end of turn): its
    loss and statistics are 0."""
    chosen, rejected = logps.chunk(2)
    n_chosen, n_rejected = counts.chunk(2)
    real = n_chosen > 0  # (P,)
    n_chosen, n_rejected = n_chosen.clamp(min=1), n_rejected.clamp(min=1)
    if kind == "simpo":  # reference-free: average log-probabilities, a target margin gamma
        chosen, rejected = chosen / n_chosen, rejected / n_rejected
        losses = -F.logsigmoid(beta * (chosen - rejected) - gamma)
        reward_w, reward_l = beta * chosen.detach(), beta * rejected.detach()
    else:
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        d_w, d_l = chosen - ref_chosen, rejected - ref_rejected
        if kind == "sigmoid":
            losses = -F.logsigmoid(beta * (d_w - d_l))
        else:  # ipo: the squared distance of the per-token margin from 1 / (2 beta)
            losses = (d_w / n_chosen - d_l / n_rejected - 1 / (2 * beta)) ** 2
        reward_w, reward_l = beta * d_w.detach(), beta * d_l.detach()
    stats = torch.stack([reward_w, reward_l, (reward_w > reward_l).float(), chosen.detach(), rejected.detach()])
    return losses.where(real, 0.0), stats * real


class Preference:
    """The objective the training loop calls instead of the next-token loss (Run.objective):
    `count` is the number of pairs a step averages over, `loss_sum` the summed loss of one
    micro-batch (it also keeps the step's statistics), `finish_step` reduces those over the
    data-parallel group into `metrics`, `evaluate` scores the held-out pairs."""

    def __init__(self, kind: str, beta: float, gamma: float, chunks: int,
                 reference: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], where: str,
                 sft_weight: float = 0.0):
        self.kind, self.beta, self.gamma, self.chunks, self.sft_weight = kind, beta, gamma, chunks, sft_weight
        self.tokens_per_pair = 1.0  # chosen-reply tokens per pair in the step's global batch (the SFT term's mean)
        self.reference = reference  # (inputs, targets) -> the reference's log-probabilities (R,), None for SimPO
        self.where = where  # what the reference is, for the run's description
        self.sums: Optional[torch.Tensor] = None  # (5,) this rank's statistics summed over the step's pairs
        self.metrics: Dict[str, float] = {}

    def count(self, micro_batches: List[Tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> torch.Tensor:
        """This rank's pairs (not the held-out padding); with the SFT term, also the global batch's chosen
        tokens per pair (collective)."""
        pairs = torch.tensor(float(sum(real_pairs(y) for _, y in micro_batches)), device=device)
        if self.sft_weight:
            tokens = sum((y[: y.shape[0] // 2] != IGNORE).sum().item() for _, y in micro_batches)
            both = dp_all_reduce(torch.stack([pairs, torch.tensor(float(tokens), device=device)]))
            self.tokens_per_pair = max((both[1] / both[0].clamp(min=1)).item(), 1e-6)
        return pairs

    def loss_sum(self, forward, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The summed loss of this micro-batch's pairs; inputs/targets (2P, T), chosen rows first."""
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref = self.reference(inputs, targets)
        logps, counts = response_logps(forward, inputs, targets, self.chunks)
        losses, stats = preference_loss(self.kind, self.beta, self.gamma, logps, counts, ref)
        self.sums = stats.sum(dim=1) if self.sums is None else self.sums + stats.sum(dim=1)
        if self.sft_weight:  # divided by pairs in the step: the chosen tokens' mean NLL, times the weight
            return losses.sum() - self.sft_weight * logps.chunk(2)[0].sum() / self.tokens_per_pair
        return losses.sum()

    def finish_step(self, count: torch.Tensor, prefix: str = "") -> None:
        """The step's statistics as means over its `count` pairs (all data-parallel ranks), TRL's names."""
        means = (dp_all_reduce(self.sums) / count.clamp(min=1.0)).tolist()
        self.sums = None
        self.metrics.update({prefix + name: value for name, value in zip(NAMES, means)})
        self.metrics[prefix + "rewards/margins"] = means[0] - means[1]

    def pop_metrics(self) -> Dict[str, float]:
        metrics, self.metrics = self.metrics, {}
        return metrics

    @torch.no_grad()
    def evaluate(self, run) -> Optional[float]:
        """Mean loss over the fixed held-out pairs (every rank gets the same number), or None;
        the eval_ statistics go to `metrics`."""
        if not run.data.val:
            return None
        model = run.net.model
        model.eval()
        self.count(run.data.val, run.device)  # the SFT term's tokens per pair, over the held-out set
        totals = torch.zeros(2, device=run.device)  # (summed loss, pairs)
        for x, y in run.data.val:
            with run.autocast():
                totals[0] += self.loss_sum(model, x.to(run.device), y.to(run.device))
            totals[1] += real_pairs(y)
        model.train()
        dp_all_reduce(totals)
        self.finish_step(totals[1], prefix="eval_")
        return (totals[0] / totals[1]).item() if totals[1] > 0 else None

    def describe(self) -> str:
        extra = (f", gamma {self.gamma}" if self.kind == "simpo" else "") + \
            (f", + {self.sft_weight} x chosen NLL" if self.sft_weight else "")
        return f"objective {self.kind} (beta {self.beta}{extra}), reference: {self.where}"


def real_pairs(targets: torch.Tensor) -> int:
    """The pairs of a micro-batch (2P, T) with trained tokens: all but held-out padding."""
    return int((targets[: targets.shape[0] // 2] != IGNORE).any(dim=1).sum())


def objective(cfg, model, device: torch.device) -> Preference:
    """The DPO objective of a run, its reference made from `model` (the starting weights, adapters
    attached): call before the policy is distributed, since a full copy must be taken first."""
    if cfg.dpo_loss == "simpo":
        reference, where = None, "none (SimPO is reference-free)"
    elif cfg.lora_rank:
        def reference(x, y):
            with lora.disabled(model):
                return response_logps(model, x, y, cfg.loss_chunks)[0]
        where = "the base with the LoRA adapters off"
    else:
        ref = frozen_copy(cfg, model, device)

        def reference(x, y):
            return response_logps(ref, x, y, cfg.loss_chunks)[0]
        where = f"a frozen copy of the starting weights ({str(compute_dtype(cfg, device)).removeprefix('torch.')})"
    return Preference(cfg.dpo_loss, cfg.dpo_beta, cfg.simpo_gamma, cfg.loss_chunks, reference, where,
                      cfg.dpo_sft_weight)


def frozen_copy(cfg, model, device: torch.device):
    """The starting weights once more, frozen, in the compute dtype, split like the policy: the
    same model-parallel shard, and under FSDP sharded over the data-parallel group."""
    dtype = compute_dtype(cfg, device)
    ref = copy.deepcopy(model).eval()
    lora.freeze_base(ref, dtype)  # no adapters here: every parameter frozen and cast
    if cfg.data_parallel == "fsdp":
        return fsdp.shard_model(ref, device, cfg.reshard_after_forward, dtype)
    return ref.to(device)

