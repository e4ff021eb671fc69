"""The contrastive rule in float32 with float64's decisions (what `model.contrastive.decode` runs).

The elementwise rule's scores are computed in float32 together with a proven bound on their error;
a decision the bound settles is float64's, and the few positions it leaves are decided again in
float64 by `model.contrastive.decide`. The proof is below; tests/test_certified_rule.py checks the
bound where the rule is ill-conditioned and the decisions on near-ties. Symbols as in
model/contrastive.py.
"""
from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch

from model import contrastive
from model.contrastive import EPS, LOG2, Decision, DecodingRule
from model.losses import in_range

_log = logging.getLogger(__name__)

# The rule's scores S(v) = (1 + alpha(v)) z_target(v) - beta(v) z_source(v) are computed in float32,
# and with them a bound delta per position on |S32(v) - S(v)| over every column v (S exact). A
# decision taken on S32 (an arg-max, or which side of R_T the arg-max lies) is float64's whenever
# the two candidates it chose between differ by more than 2 delta: then the exact scores, and the
# float64 ones (whose own error is 2^29 times smaller), order them the same way and cannot tie.
# The positions left are decided again in float64.
#
# The bound is first order in the unit roundoff u = 2^-24, with exp, log and log1p accurate to F
# ulps (relative error <= 2 F u). For one distribution p = softmax(z) over C columns, with
# d = z - max z <= 0 and the row sum s of exp(d) in float32 partial sums of 16 terms (each
# within 15 u) added in float64:
#   relerr(s) <= u R,  R = log C + 2F + 2 + 15   (the terms' own errors: a p-weighted mean of
#                                                 relerr(exp d) <= u (|d| + 2F), E_p|d| <= log C)
#   relerr(p(v)) <= u (|d(v)| + R + 1),   |err log p(v)| <= u (2 |log p(v)| + K),  K = R + 2F log C,
# using |d(v)| <= |log p(v)|. Domain confidence: H(v) = -p log(p + EPS) is computed as
# p ((max z - z) + log s) = -p log p, without a logarithm per item: log p so formed errs by at most
# u (|d| + |log p| + K) <= u (2 |log p| + K) as above, and -p log p exceeds -p log(p + EPS) by
# p log1p(EPS / p) in [0, EPS]. In float32 H errs by at most u K_H,
#   K_H = 4/e^2 + (R + 2F + 4)/e + R + 3
# (p (x + R') (1 + x) + ... with x = -log p, and max x^k e^-x = (k/e)^k), and as
# D = 1 - max H + EPS >= 1 - 1/e and alpha <= 1 / (1 - 1/e) = 1.582, alpha errs by at most
#   u A,  A = (2.582 K_H + 4.2) / 0.632 + 1.6,
# plus 2.582 EPS / 0.632 < 5 EPS for the dropped EPS; so the first term of S errs by at most
# (u (A + 6) + 5 EPS) max|z_target|.
#
# Transfer reward: B = 2 log m - log p_mix - log p_source is computed as 2 log cosh(t / 2) with
# t = log p_source - log p_mix = (z_source - z_mix) - (lse_source - lse_mix), the same number
# without the cancellation that makes the textbook form lose all its digits where the two models
# agree (there B ~ t^2 / 4, next to log-probabilities of ~ -10); log cosh x = log1p(2 sinh(x/2)^2).
# With c = lse_source - lse_mix, each lse erring by at most u (|lse| + K):
#   |err t| <= u (2 |t| + E_t),  E_t = 2 |c| + |lse_mix| + |lse_source| + K_mix + K_source,
#   |err B| <= min(1, |t|/2) |err t| + (6F + 2) u B     (|d/dt 2 log cosh(t/2)| = |tanh(t/2)|),
# and since min(1, |t|/2) |t| <= 2.31 B and min(1, |t|/2) <= sqrt(1.155 B), the product
# J = m B / 2, m = (p_mix + p_source) / 2 (relative error <= u (M + R + 2), M the row's largest
# -log p of either model), errs by at most
#   e_J = u (J_max (M + R + 6F + 11) + 0.76 E_t sqrt(m_max J_max)),
# with m_max <= (max p_mix + max p_source) / 2. beta = J / (J_max + EPS) errs by at most
#   e_beta = 2 e_J / (J_max + EPS - e_J) + 2u   (unbounded, so undecided, when J_max is that small),
# and the second term of S by (e_beta + 2u) max|z_source|. (The code forms 4 J = (p_mix + p_source)
# log cosh(t/2), and beta = 4 J / (4 J_max + 4 EPS): scaling by a power of two rounds nothing.) delta is twice the sum: a margin for the
# second-order terms and for kernels less accurate than assumed. tests/test_contrastive.py checks
# |S32 - S64| <= delta, also on logits built to make beta ill-conditioned.

_U32 = 2.0 ** -24
_FUNCTION_ULPS = 4  # accuracy assumed of float32 exp, log, log1p: torch's kernels are within 1 to 2 ulp
_SAFETY = 2.0


class _Distribution(NamedTuple):
    p: torch.Tensor  # (P, C) softmax
    lse: torch.Tensor  # (P, 1) log-sum-exp of the logits
    K: torch.Tensor  # (P, 1) |err lse| <= u (|lse| + K), |err log p| <= u (2 |log p| + K)
    R: torch.Tensor  # (P, 1) relerr(row sum) / u
    max_surprise: torch.Tensor  # (P, 1) max over columns of -log p
    abs_max: torch.Tensor  # (P, 1) max |z|
    p_max: torch.Tensor  # (P, 1)
    top: torch.Tensor  # (P, 1) max z
    log_s: torch.Tensor  # (P, 1) log of the row sum of exp(z - top): log p = z - top - log_s


_PARTIAL = 16  # terms per float32 partial sum in `_row_sum`


def _row_sum(e: torch.Tensor) -> torch.Tensor:
    """(P, 1) float64 sums of the non-negative rows of e (P, C), with relative error <= (_PARTIAL - 1) u.

    Partial sums of 16 neighbours in float32 (each errs by at most 15 u, in any order of addition),
    then their sum in float64: a bound that does not grow with C, at a tenth of the cost of
    summing everything in float64 (which casts the whole tensor first).
    """
    P, C = e.shape
    whole = C - C % _PARTIAL
    sums = e[:, :whole].reshape(P, whole // _PARTIAL, _PARTIAL).sum(dim=-1).sum(dim=-1, keepdim=True, dtype=torch.float64)
    return sums + e[:, whole:].sum(dim=-1, keepdim=True, dtype=torch.float64)


def _distribution32(z: torch.Tensor) -> _Distribution:
    top, bottom = z.amax(dim=-1, keepdim=True), z.amin(dim=-1, keepdim=True)
    e = (z - top).exp_()
    log_s = _row_sum(e).log().to(torch.float32)
    log_C = math.log(z.shape[-1]) if z.shape[-1] > 1 else 0.0
    R = torch.full_like(log_s, log_C + 2 * _FUNCTION_ULPS + 2 + (_PARTIAL - 1))
    p_max = torch.exp(-log_s)
    return _Distribution(p=e.mul_(p_max), lse=top + log_s, K=R + 2 * _FUNCTION_ULPS * log_C, R=R,
                         max_surprise=log_s + (top - bottom), abs_max=torch.maximum(top.abs(), bottom.abs()),
                         p_max=p_max, top=top, log_s=log_s)


class Transfer32(NamedTuple):
    """The target-independent half of the float32 scores: computed once per position and shared by
    every target domain decided there (it depends on the base model and the source expert only)."""

    penalty: torch.Tensor  # (P, C) beta * z_source
    error: torch.Tensor  # (P, 1) bound on the penalty's error (before _SAFETY)


def transfer_float32(z_source: torch.Tensor, z_mix: torch.Tensor) -> Transfer32:
    """beta * z_source in float32 and the bound on its error (the transfer reward part of the bound above)."""
    u, F = _U32, _FUNCTION_ULPS
    mix, source = _distribution32(z_mix), _distribution32(z_source)
    c = source.lse - mix.lse
    quarter_t = (z_source - z_mix).sub_(c).mul_(0.25)
    # 4 J = (p_mix + p_source) log cosh(t/2), log cosh x = log1p(2 sinh(x/2)^2); past |t/2| = 80
    # sinh^2 overflows float32 and log cosh x = |x| - log 2 there
    far = quarter_t.abs() > 40
    # (a compiled kernel takes the branch always: it costs nothing fused, and a data-dependent test would split it)
    log_cosh = quarter_t.clone() if torch.compiler.is_compiling() or far.any() else None
    J4 = quarter_t.sinh_().square_().mul_(2).log1p_()
    if log_cosh is not None:
        J4 = torch.where(far, log_cosh.abs_().mul_(2).sub_(LOG2), J4)
    J4.mul_(mix.p.add_(source.p))
    J4_max = J4.amax(dim=-1, keepdim=True)
    J_max = J4_max / 4
    penalty = J4.div_(J4_max + 4 * EPS).mul_(z_source)
    R = torch.maximum(mix.R, source.R)
    M = torch.maximum(mix.max_surprise, source.max_surprise)
    E_t = 2 * c.abs() + mix.lse.abs() + source.lse.abs() + mix.K + source.K
    m_max = (mix.p_max + source.p_max) / 2
    e_J = u * (J_max * (M + R + 6 * F + 11) + 0.76 * E_t * torch.sqrt(m_max * J_max))
    room = J_max + EPS - e_J
    e_beta = torch.where(room > 0, 2 * e_J / room.clamp_min(EPS), math.inf) + 2 * u
    return Transfer32(penalty, (e_beta + 2 * u) * source.abs_max)


def confidence_float32(z_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 + alpha) * z_target in float32 (P, C) and the bound on its error (P, 1), before _SAFETY."""
    u, F = _U32, _FUNCTION_ULPS
    target = _distribution32(z_target)
    H = torch.sub(target.top, z_target).add_(target.log_s).mul_(target.p)  # -p log p
    inverse_D = 1 / (1 - H.amax(dim=-1, keepdim=True) + EPS)
    scores = H.mul_(-inverse_D).add_(1 + inverse_D).mul_(z_target)
    K_H = 4 / math.e**2 + (target.R + 2 * F + 4) / math.e + target.R + 3
    return scores, target.abs_max * (u * ((2.582 * K_H + 4.2) / 0.632 + 1.6 + 6) + 5 * EPS)


class Fused:
    """`function` compiled by torch.compile into fused loops (one trip through memory where eager
    PyTorch makes a dozen), or `function` itself where no compiler works: the first failure is
    logged and the eager function used from then on. The bound above holds for either: a compiled
    exp, log1p or sinh is as accurate as the eager one, and fusing only removes roundings. One row
    goes eagerly: a compiled kernel specialises a size of 1, and would compile again for it."""

    def __init__(self, function):
        self.function, self.compiled, self.failed = function, None, False

    def __call__(self, *tensors: torch.Tensor):
        if not self.failed and tensors[0].shape[0] > 1:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.function, dynamic=False)
                for tensor in tensors:  # one kernel for every number of rows; the columns stay fixed
                    torch._dynamo.mark_dynamic(tensor, 0)
                return self.compiled(*tensors)
            except Exception as error:  # no C++ compiler, an unsupported platform, ...
                _log.warning("the float32 rule runs unfused: torch.compile failed (%s: %s)",
                             type(error).__name__, str(error).splitlines()[0] if str(error) else "")
                self.failed = True
        return self.function(*tensors)


class Kernels(NamedTuple):
    confidence: object  # z_target -> (scores, error)
    transfer: object  # (z_source, z_mix) -> Transfer32


EAGER = Kernels(confidence_float32, transfer_float32)
FUSED = Kernels(Fused(confidence_float32), Fused(transfer_float32))


def scores_float32(z_target: torch.Tensor, z_source: torch.Tensor | None, z_mix: torch.Tensor | None,
                    source_experts: bool, transfer: Transfer32 | None = None,
                    kernels: Kernels = EAGER) -> tuple[torch.Tensor, torch.Tensor]:
    """(S32 (P, C), delta (P,)): the elementwise rule's scores in float32 and the bound above on their error.
    `transfer`: the transfer half already computed from z_source and z_mix (shared across targets)."""
    scores, error = kernels.confidence(z_target)
    if source_experts:
        transfer = transfer or kernels.transfer(z_source, z_mix)
        scores.sub_(transfer.penalty)
        error = error + transfer.error
    return scores, (_SAFETY * error).squeeze(-1)


def _top_two(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(arg-max, best, second best) per row of (P, C), in one pass; second is -inf when C == 1.

    On a tie topk may name any of the tied columns, not the first; a tie is never `_apart`, so
    such a row is decided again in float64, whose arg-max takes the first."""
    if scores.shape[-1] == 1:
        best, at = scores.max(dim=-1)
        return at, best, torch.full_like(best, -math.inf)
    values, at = scores.topk(2, dim=-1, sorted=True)
    return at[:, 0], values[:, 0], values[:, 1]


def _apart(best: torch.Tensor, second: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Whether two float32 scores are ordered as their exact values are (False on NaN)."""
    # 4 u |best| covers the rounding of the difference itself
    return (best - second) > 2 * delta + 4 * _U32 * best.abs()


def _max_outside(scores: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Max per row over the columns outside R_T = ids [lo, hi); -inf where there are none."""
    parts = [part.amax(dim=-1) for part in (scores[:, : lo - 1], scores[:, hi - 1:]) if part.shape[-1]]
    if not parts:
        return torch.full((scores.shape[0],), -math.inf, dtype=scores.dtype, device=scores.device)
    return parts[0] if len(parts) == 1 else torch.maximum(*parts)


def decide_certified(z_target, z_source, z_mix, target_range: tuple[int, int], rule: DecodingRule,
                      transfer: Transfer32 | None = None, kernels: Kernels = EAGER) -> Decision:
    """`contrastive.decode` in float32 where the error bound settles the decision, in float64 elsewhere;
    `transfer`: the global scores' transfer half, when already computed for another target."""
    lo, hi = target_range
    R_T = slice(lo - 1, hi - 1)
    shift = 1 if rule.reference_shift else 0
    inputs = (z_target, z_source if rule.source_experts else None, z_mix if rule.source_experts else None)

    def local(rows) -> tuple[torch.Tensor, torch.Tensor]:
        return scores_float32(*(None if z is None else z[rows, R_T] for z in inputs), rule.source_experts,
                              kernels=kernels)

    if not rule.global_test:
        L, delta = local(slice(None))
        at, best, second = _top_two(L)
        items = at + (lo + shift)
        convertible = torch.ones(len(items), dtype=torch.bool, device=items.device)
        settled = _apart(best, second, delta)
    else:
        G, delta = scores_float32(*inputs, rule.source_experts, transfer, kernels)
        best_in, best_out = G[:, R_T].amax(dim=-1), _max_outside(G, lo, hi)
        convertible = best_in > best_out
        settled = _apart(torch.maximum(best_in, best_out), torch.minimum(best_in, best_out), delta)
        if rule.local_scores and convertible.any():
            rows = convertible.nonzero().squeeze(1)
            L, delta_L = local(rows)
            G[rows, R_T] = L
            delta[rows] = torch.maximum(delta[rows], delta_L)
        # The arg-max itself matters where the item may be kept: at convertible positions, and at
        # every one with the shift; elsewhere it lies outside R_T and the item is deleted.
        items = torch.zeros(len(G), dtype=torch.long, device=G.device)
        need = (convertible | bool(shift)).nonzero().squeeze(1)
        if len(need):
            at, best, second = _top_two(G[need])
            settled[need] &= _apart(best, second, delta[need])
            items[need] = at + (1 + shift)
        del G
    items = torch.where(in_range(items, (lo, hi)), items, 0)
    unsettled = (~settled).nonzero().squeeze(1)
    if len(unsettled):
        exact = contrastive.decide(*(None if z is None else z[unsettled] for z in (z_target, z_source, z_mix)),
                                   target_range, rule)
        items[unsettled], convertible[unsettled] = exact.items, exact.convertible
    return Decision(items=items, convertible=convertible)
