"""The joint loss of AU-CVT (arXiv:2207.09777, section 3.4): L = alpha * CE(expression) + beta * BCE(AU).

A batch may mix samples with only an expression label (LSD), only AU labels (RAF-AU) or both (LSD with OpenFace
pseudo-AUs). The dataset contract marks a missing expression with -1 and a missing AU with NaN; each term
averages over the samples (CE) or the AU entries (BCE) that carry its label, and a batch without any label of a
kind contributes 0 for that term (not NaN), so its gradient is simply absent.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['JointLoss', 'label_counts']


def label_counts(expressions: torch.Tensor, aus: torch.Tensor) -> Tuple[int, int]:
    """Number of samples with an expression label and of labelled AU entries in a batch."""
    return int((expressions >= 0).sum()), int((~torch.isnan(aus)).sum())


class JointLoss(nn.Module):
    """alpha * cross-entropy over labelled expressions + beta * BCE-with-logits over labelled AU entries.

    By default each term is a mean over the labels present in the batch. The trainer passes `expression_norm` and
    `au_norm` to average over a larger unit instead (all micro-batches of a gradient-accumulation step, divided by
    the number of processes), so that accumulated and distributed steps compute the same gradient as one big batch.

    Args:
        alpha: weight of the expression term (paper default 1).
        beta: weight of the AU term (paper default 1).
        label_smoothing: label smoothing of the cross-entropy (0 in the paper).
    """

    def __init__(self, alpha: float = 1., beta: float = 1., label_smoothing: float = 0.):
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.label_smoothing = label_smoothing

    def forward(
            self,
            expression_logits: torch.Tensor,
            au_logits: torch.Tensor,
            expressions: torch.Tensor,
            aus: torch.Tensor,
            expression_norm: Optional[float] = None,
            au_norm: Optional[float] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Total loss and its detached parts ('expression', 'au').

        Args:
            expression_logits: (B, num_classes).
            au_logits: (B, A); A may be 0 for a model without an AU branch.
            expressions: (B,) expression indices, -1 where a sample has none.
            aus: (B, A) AU targets in [0, 1], NaN where an AU is not labelled.
            expression_norm: divide the summed CE by this instead of the number of labelled samples.
            au_norm: divide the summed BCE by this instead of the number of labelled AU entries.
        """
        if au_logits.shape != aus.shape:
            raise ValueError(
                f'AU logits {tuple(au_logits.shape)} and AU targets {tuple(aus.shape)} differ in shape: the model '
                f'predicts {au_logits.shape[-1]} AUs but the labels have {aus.shape[-1]}. Read the AU labels in the '
                f"model's AU order (model.au_names).")
        # losses are reduced in float32 whatever the autocast dtype, so masked sums stay exact enough
        expression_logits, au_logits = expression_logits.float(), au_logits.float()

        has_expression = expressions >= 0
        ce = F.cross_entropy(
            expression_logits, expressions.clamp(min=0), reduction='none', label_smoothing=self.label_smoothing)
        # torch.where, not multiplication: a masked-out term must not leak a NaN/inf into the sum
        ce_sum = torch.where(has_expression, ce, torch.zeros_like(ce)).sum()
        ce_norm = expression_norm if expression_norm is not None else has_expression.sum().item()

        has_au = ~torch.isnan(aus)
        bce = F.binary_cross_entropy_with_logits(au_logits, torch.nan_to_num(aus, nan=0.), reduction='none')
        bce_sum = torch.where(has_au, bce, torch.zeros_like(bce)).sum()
        bce_norm = au_norm if au_norm is not None else has_au.sum().item()

        # with no label of a kind the sum is an exact 0 (connected to the graph), so it is returned undivided
        expression_loss = ce_sum / ce_norm if ce_norm > 0 else ce_sum
        au_loss = bce_sum / bce_norm if bce_norm > 0 else bce_sum
        total = self.alpha * expression_loss + self.beta * au_loss
        return total, {'expression': expression_loss.detach(), 'au': au_loss.detach()}
