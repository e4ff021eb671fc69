"""Stage II: adaptive contrastive decoding, as pure functions of the three models' logits.

Symbols follow docs/method.md (Stage II). For P positions the callers pass logits over all N real items,
each a float tensor (P, N) whose column j is item id j + 1 (id 0 is padding and has no column):

    z_target  target-domain expert E_T        p_target = softmax(z_target)
    z_source  expert of the source item's domain E_S
    z_mix     base (mixed) model M            p_mix = softmax(z_mix)

The target domain owns the half-open id range R_T = (lo, hi), i.e. columns lo - 1 .. hi - 2.
The contrastive score is (1 + alpha) * z_target - beta * z_source with the adaptive weights alpha
(domain confidence) and beta (transfer reward). Every function returns new tensors and leaves its
inputs untouched.

NOTE: the reference's score vectors also hold the padding column (index i is item id i), so its
global softmaxes include padding; here they run over the N real items only.
"""

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from data.domains import checked_item_range
from model.losses import in_range

_log = logging.getLogger(__name__)

EPS = 1e-10  # the reference's guard in log(p + EPS) and in the normalisers of alpha and beta
LOG2 = math.log(2.0)
WEIGHTS = ("elementwise", "position")


def _check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weighting {weights!r}; expected one of {WEIGHTS}")


_PRECISION = [torch.float64]  # what the rule computes in; see `computed_in`


@contextlib.contextmanager
def computed_in(dtype: torch.dtype):
    """Compute the rule in `dtype` inside the block; only for measuring what the reference code
    does (float32): the project's decisions are float64's (`_as_float`)."""
    _PRECISION.append(dtype)
    try:
        yield
    finally:
        _PRECISION.pop()


def _as_float(name: str, z: torch.Tensor) -> torch.Tensor:
    """Check one logits tensor and return it in float64 (the precision whose decisions count).

    The transfer reward takes tiny differences of log-probabilities (log m - log p is about
    1e-5 where the base model and a source expert agree, next to log-probabilities of about
    -7): written this way in float32 its rounding error reaches 10% of beta and moves
    arg-maxes. `decode` gets float64's decisions at float32's cost otherwise (see the float32
    section below).
    """
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {getattr(z, 'dtype', type(z))}")
    if z.ndim < 1 or z.shape[-1] == 0:
        raise ValueError(f"{name} needs at least one candidate column, got shape {tuple(z.shape)}")
    return z.to(_PRECISION[-1])


def _check_same_shape(**logits: torch.Tensor) -> None:
    shapes = {name: tuple(z.shape) for name, z in logits.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"logits must share one shape, got {shapes}")


def domain_confidence(z_target: torch.Tensor, weights: str = "elementwise") -> torch.Tensor:
    """alpha from the target expert's logits (..., C); larger where the target expert is confident.

    elementwise (the reference): H(v) = -p_target(v) log(p_target(v) + EPS) and
        alpha(v) = (1 - H(v)) / (1 - max_u H(u) + EPS), shape (..., C).
    position (the paper's prose): alpha = 1 - H(p_target) / log C with H the Shannon entropy
        of the whole distribution over the C candidates, shape (..., 1).
    """
    _check_weights(weights)
    z_target = _as_float("z_target", z_target)
    if weights == "elementwise":
        p_target = F.softmax(z_target, dim=-1)
        H = torch.log(p_target + EPS).mul_(p_target).neg_()
        denominator = 1 - H.amax(dim=-1, keepdim=True) + EPS
        return H.neg_().add_(1).div_(denominator)
    log_p_target = F.log_softmax(z_target, dim=-1)
    # a probability that underflowed to 0 has a finite log-probability, so 0 * log p = 0
    H = -(log_p_target.exp() * log_p_target).sum(dim=-1, keepdim=True)
    C = z_target.shape[-1]
    # one candidate: H = 0 and alpha = 1 for any positive normaliser, log 1 = 0 would give 0 / 0
    return 1 - H / (math.log(C) if C > 1 else 1.0)


def transfer_reward(z_mix: torch.Tensor, z_source: torch.Tensor, weights: str = "elementwise") -> torch.Tensor:
    """beta from the base model's and the source expert's logits (..., C), with m = (p_mix + p_source) / 2.

    elementwise (the reference): J(v) = 1/2 [m(v) (log m(v) - log p_mix(v)) + m(v) (log m(v) - log p_source(v))]
        and beta(v) = J(v) / (max_u J(u) + EPS), shape (..., C). NOTE: this is the reference's
        `F.kl_div(p.log(), m)`, i.e. KL(m || p) per item, not the Jensen-Shannon terms; kept as is.
    position (the paper's prose): beta = 1 - JSD(p_mix, p_source) / log 2 with the true
        Jensen-Shannon divergence 1/2 [KL(p_mix || m) + KL(p_source || m)], which lies in [0, log 2]
        (the sum of the J above is unbounded), shape (..., 1).
    """
    _check_weights(weights)
    z_mix, z_source = _as_float("z_mix", z_mix), _as_float("z_source", z_source)
    _check_same_shape(z_mix=z_mix, z_source=z_source)
    log_p_mix = F.log_softmax(z_mix, dim=-1)
    log_p_source = F.log_softmax(z_source, dim=-1)
    # log m from the log-probabilities: finite wherever they are, so m = 0 only multiplies finite logs
    log_m = torch.logaddexp(log_p_mix, log_p_source) - LOG2
    if weights == "elementwise":
        J = (2 * log_m - log_p_mix - log_p_source).mul_(log_m.exp()).mul_(0.5)
        return J.div_(J.amax(dim=-1, keepdim=True) + EPS)
    JSD = 0.5 * (
        (log_p_mix.exp() * (log_p_mix - log_m)).sum(dim=-1, keepdim=True)
        + (log_p_source.exp() * (log_p_source - log_m)).sum(dim=-1, keepdim=True)
    )
    return 1 - JSD / LOG2


def contrastive_scores(
    z_target: torch.Tensor,
    z_source: torch.Tensor | None,
    z_mix: torch.Tensor | None,
    weights: str = "elementwise",
    source_experts: bool = True,
) -> torch.Tensor:
    """(1 + alpha) * z_target - beta * z_source over the C columns given, shape (..., C).

    Global and local scores are this one function, called on all N items or on the columns of
    R_T only, so every softmax, entropy, divergence and max is taken over the columns passed.
    Without source experts (ablation w/o SDE) beta = 0 and z_source, z_mix may be None.
    """
    _check_weights(weights)
    z_target = _as_float("z_target", z_target)
    scores = (1 + domain_confidence(z_target, weights)) * z_target
    if not source_experts:
        return scores
    if z_source is None or z_mix is None:
        raise ValueError("z_source and z_mix are required when source_experts is True")
    z_source, z_mix = _as_float("z_source", z_source), _as_float("z_mix", z_mix)
    _check_same_shape(z_target=z_target, z_source=z_source, z_mix=z_mix)
    return scores.sub_(transfer_reward(z_mix, z_source, weights) * z_source)


@dataclass(frozen=True)
class DecodingRule:
    """How source items are decoded; the defaults are the paper's Taesar.

    weights: "elementwise" (the reference's per-item alpha, beta: what produced the paper's
        numbers) or "position" (one alpha and one beta per position, as the paper's prose says).
    The Table 3 ablations:
        w/o SDE: source_experts=False (beta = 0: the target expert alone decides);
        w/o GCS: global_test=False (no global test; only the local score over R_T, so every source
            item is replaced by a target item, never deleted);
        w/o LCS: local_scores=False (the global score alone decides).
    reference_shift: reproduce the reference code's `argmax + 1` (it writes the id after the
        chosen one). Exists only to compare with numbers produced by the reference; never for results.
    """

    weights: str = "elementwise"
    source_experts: bool = True
    global_test: bool = True
    local_scores: bool = True
    reference_shift: bool = False

    def __post_init__(self):
        _check_weights(self.weights)
        if not (self.global_test or self.local_scores):
            raise ValueError("global_test=False and local_scores=False together leave no score to decode with")


class Decision(NamedTuple):
    """Outcome of `decode` for P positions.

    items: (P,) long, the new item id, or 0 where the source item is deleted (replaced = items != 0).
    convertible: (P,) bool, whether the global score's arg-max lay in R_T (all True without the
        global test). A convertible position can still be deleted when its local scores lose to
        a score outside R_T, and with reference_shift a non-convertible one can be replaced.
    """

    items: torch.Tensor
    convertible: torch.Tensor


def decode(
    z_target: torch.Tensor,
    z_source: torch.Tensor | None,
    z_mix: torch.Tensor | None,
    target_range: tuple[int, int],
    rule: DecodingRule = DecodingRule(),
    certified_float32: bool = True,
) -> Decision:
    """Choose a target item, or deletion, for P source-item positions from logits (P, N).

    1. The global score G over all N items; a position is convertible iff argmax G lies in R_T.
    2. For convertible positions (unless w/o LCS) the local score over R_T replaces G on R_T.
    3. The new item is the arg-max of the updated scores: kept if it lies in R_T, else deleted (0).
       A non-convertible position keeps G, whose arg-max lies outside R_T, so it is deleted.
    w/o GCS: the paper says this variant uses only the local contrastive score, so every position
    takes the arg-max over R_T of the local score and none is deleted.
    Exact ties go to the lowest item id (torch.argmax returns the first maximum; columns are in id
    order). With rule.reference_shift the chosen id becomes arg-max + 1 and replace/delete is decided
    on that id, for every position; convertibility stays on the unshifted arg-max.
    Rows are independent: callers may pass any chunk of positions.

    The decisions are those of the rule in float64. With `certified_float32` (and float32 logits,
    elementwise weights) the rule runs in float32 with an error bound per position, and only the
    positions whose decision the bound cannot settle are decided again in float64 (see
    `_scores_float32`): the same decisions at about half the cost.
    """
    return decode_targets({0: z_target}, z_source, z_mix, {0: target_range}, rule, certified_float32)[0]


def decode_targets(
    z_targets: dict[int, torch.Tensor],
    z_source: torch.Tensor | None,
    z_mix: torch.Tensor | None,
    target_ranges: dict[int, tuple[int, int]],
    rule: DecodingRule = DecodingRule(),
    certified_float32: bool = True,
    fused: bool = False,
) -> dict[int, Decision]:
    """`decode` for several target domains at the same P positions, by target: `z_targets[t]` is
    target t's expert's logits and `target_ranges[t]` its id range. What does not depend on the
    target (the transfer reward from the base model and the source expert) is computed once;
    each target's decisions are those `decode` takes for it alone. `fused`: the certified float32
    rule's global scores by compiled kernels (`_Fused`; worth their compile time at tens of
    thousands of items), the same decisions."""
    if not isinstance(rule, DecodingRule):
        raise ValueError(f"rule must be a DecodingRule, got {type(rule).__name__}")
    if set(z_targets) != set(target_ranges):
        raise ValueError(f"z_targets and target_ranges must name the same targets, got {sorted(z_targets)} "
                         f"and {sorted(target_ranges)}")
    shared = {"z_source": z_source, "z_mix": z_mix}
    shared = {name: z for name, z in shared.items() if z is not None}  # no source experts: w/o SDE
    ranges, float32 = {}, all(z.dtype == torch.float32 for z in shared.values())
    for t, z_target in z_targets.items():
        given = {"z_target": z_target, **shared}
        if z_target is None:
            raise ValueError("z_target is required")
        for name, z in given.items():
            if not isinstance(z, torch.Tensor) or z.ndim != 2:
                raise ValueError(f"{name} must be a (P, N) tensor, got {getattr(z, 'shape', type(z).__name__)}")
        _check_same_shape(**given)
        if target_ranges[t] is None:  # a range must be given: None (every item) would make every item a target
            raise ValueError("target_range must be a pair of item ids (lo, hi), got None")
        ranges[t] = checked_item_range(target_ranges[t], z_target.shape[1], "target_range")
        float32 &= z_target.dtype == torch.float32
    if not (certified_float32 and rule.weights == "elementwise" and _PRECISION[-1] == torch.float64 and float32):
        return {t: _decode_in_precision(z, z_source, z_mix, ranges[t], rule) for t, z in z_targets.items()}
    # the global scores' transfer half, shared by the targets (the local scores' is per target range)
    # one row goes eagerly: a compiled kernel specialises a size of 1, and would compile again for it
    kernels = FUSED if fused and next(iter(z_targets.values())).shape[0] > 1 else EAGER
    transfer = (kernels.transfer(z_source, z_mix)
                if rule.source_experts and rule.global_test and len(z_targets) > 1 else None)
    return {t: _decode_certified(z, z_source, z_mix, ranges[t], rule, transfer, kernels) for t, z in z_targets.items()}


def _decode_in_precision(z_target, z_source, z_mix, target_range: tuple[int, int], rule: DecodingRule) -> Decision:
    """`decode` with the rule computed in the current precision (float64 unless `computed_in` says)."""
    lo, hi = target_range
    R_T = slice(lo - 1, hi - 1)  # the columns of the target items
    shift = 1 if rule.reference_shift else 0

    def local(rows) -> torch.Tensor:
        # rows picks positions (a slice or an index tensor); [rows, R_T] copies only (P', |R_T|)
        return contrastive_scores(
            *(None if z is None else z[rows, R_T] for z in (z_target, z_source, z_mix)),
            weights=rule.weights,
            source_experts=rule.source_experts,
        )

    if not rule.global_test:
        items = local(slice(None)).argmax(dim=-1) + (lo + shift)
        convertible = torch.ones(len(items), dtype=torch.bool, device=items.device)
    else:
        G = contrastive_scores(z_target, z_source, z_mix, rule.weights, rule.source_experts)  # (P, N)
        items = G.argmax(dim=-1) + 1
        convertible = in_range(items, (lo, hi))
        if rule.local_scores and convertible.any():
            rows = convertible.nonzero().squeeze(1)
            G[rows, R_T] = local(rows)  # G is ours: update it in place rather than copy the rows
            items = G.argmax(dim=-1) + 1  # unchanged on the non-convertible rows
        del G
        items = items + shift
    return Decision(items=torch.where(in_range(items, (lo, hi)), items, 0), convertible=convertible)


# --------------------------------------------------------------------------- float32 with float64's decisions
#
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


class _Transfer32(NamedTuple):
    """The target-independent half of the float32 scores: computed once per position and shared by
    every target domain decided there (it depends on the base model and the source expert only)."""

    penalty: torch.Tensor  # (P, C) beta * z_source
    error: torch.Tensor  # (P, 1) bound on the penalty's error (before _SAFETY)


def _transfer_float32(z_source: torch.Tensor, z_mix: torch.Tensor) -> _Transfer32:
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
    return _Transfer32(penalty, (e_beta + 2 * u) * source.abs_max)


def _confidence_float32(z_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 + alpha) * z_target in float32 (P, C) and the bound on its error (P, 1), before _SAFETY."""
    u, F = _U32, _FUNCTION_ULPS
    target = _distribution32(z_target)
    H = torch.sub(target.top, z_target).add_(target.log_s).mul_(target.p)  # -p log p
    inverse_D = 1 / (1 - H.amax(dim=-1, keepdim=True) + EPS)
    scores = H.mul_(-inverse_D).add_(1 + inverse_D).mul_(z_target)
    K_H = 4 / math.e**2 + (target.R + 2 * F + 4) / math.e + target.R + 3
    return scores, target.abs_max * (u * ((2.582 * K_H + 4.2) / 0.632 + 1.6 + 6) + 5 * EPS)


class _Fused:
    """`function` compiled by torch.compile into fused loops (one trip through memory where eager
    PyTorch makes a dozen), or `function` itself where no compiler works: the first failure is
    logged and the eager function used from then on. The bound above holds for either: a compiled
    exp, log1p or sinh is as accurate as the eager one, and fusing only removes roundings."""

    def __init__(self, function):
        self.function, self.compiled, self.failed = function, None, False

    def __call__(self, *tensors: torch.Tensor):
        if not self.failed:
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


class _Kernels(NamedTuple):
    confidence: object  # z_target -> (scores, error)
    transfer: object  # (z_source, z_mix) -> _Transfer32


EAGER = _Kernels(_confidence_float32, _transfer_float32)
FUSED = _Kernels(_Fused(_confidence_float32), _Fused(_transfer_float32))


def _scores_float32(z_target: torch.Tensor, z_source: torch.Tensor | None, z_mix: torch.Tensor | None,
                    source_experts: bool, transfer: _Transfer32 | None = None,
                    kernels: _Kernels = EAGER) -> tuple[torch.Tensor, torch.Tensor]:
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


def _decode_certified(z_target, z_source, z_mix, target_range: tuple[int, int], rule: DecodingRule,
                      transfer: _Transfer32 | None = None, kernels: _Kernels = EAGER) -> Decision:
    """`decode` in float32 where the error bound settles the decision, in float64 elsewhere;
    `transfer`: the global scores' transfer half, when already computed for another target."""
    lo, hi = target_range
    R_T = slice(lo - 1, hi - 1)
    shift = 1 if rule.reference_shift else 0
    inputs = (z_target, z_source if rule.source_experts else None, z_mix if rule.source_experts else None)

    def local(rows) -> tuple[torch.Tensor, torch.Tensor]:
        return _scores_float32(*(None if z is None else z[rows, R_T] for z in inputs), rule.source_experts)

    if not rule.global_test:
        L, delta = local(slice(None))
        at, best, second = _top_two(L)
        items = at + (lo + shift)
        convertible = torch.ones(len(items), dtype=torch.bool, device=items.device)
        settled = _apart(best, second, delta)
    else:
        G, delta = _scores_float32(*inputs, rule.source_experts, transfer, kernels)
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
        exact = _decode_in_precision(*(None if z is None else z[unsettled] for z in (z_target, z_source, z_mix)),
                                     target_range, rule)
        items[unsettled], convertible[unsettled] = exact.items, exact.convertible
    return Decision(items=items, convertible=convertible)
