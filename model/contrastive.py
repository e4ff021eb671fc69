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

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from data.domains import checked_item_range
from model.losses import in_range

EPS = 1e-10  # the reference's guard in log(p + EPS) and in the normalisers of alpha and beta
LOG2 = math.log(2.0)
WEIGHTS = ("elementwise", "position")


def _check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weighting {weights!r}; expected one of {WEIGHTS}")


def _as_float(name: str, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Check one logits tensor and return it in `dtype`: float64, the precision whose decisions
    count, unless a benchmark measures what the reference code does (float32).

    The transfer reward takes tiny differences of log-probabilities (log m - log p is about
    1e-5 where the base model and a source expert agree, next to log-probabilities of about
    -7): written this way in float32 its rounding error reaches 10% of beta and moves
    arg-maxes. `decode` gets float64's decisions at float32's cost otherwise (model/certified.py).
    """
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {getattr(z, 'dtype', type(z))}")
    if z.ndim < 1 or z.shape[-1] == 0:
        raise ValueError(f"{name} needs at least one candidate column, got shape {tuple(z.shape)}")
    return z.to(dtype)


def _check_same_shape(**logits: torch.Tensor) -> None:
    shapes = {name: tuple(z.shape) for name, z in logits.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"logits must share one shape, got {shapes}")


def domain_confidence(z_target: torch.Tensor, weights: str = "elementwise",
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """alpha from the target expert's logits (..., C); larger where the target expert is confident.

    elementwise (the reference): H(v) = -p_target(v) log(p_target(v) + EPS) and
        alpha(v) = (1 - H(v)) / (1 - max_u H(u) + EPS), shape (..., C).
    position (the paper's prose): alpha = 1 - H(p_target) / log C with H the Shannon entropy
        of the whole distribution over the C candidates, shape (..., 1).
    """
    _check_weights(weights)
    z_target = _as_float("z_target", z_target, dtype)
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


def transfer_reward(z_mix: torch.Tensor, z_source: torch.Tensor, weights: str = "elementwise",
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """beta from the base model's and the source expert's logits (..., C), with m = (p_mix + p_source) / 2.

    elementwise (the reference): J(v) = 1/2 [m(v) (log m(v) - log p_mix(v)) + m(v) (log m(v) - log p_source(v))]
        and beta(v) = J(v) / (max_u J(u) + EPS), shape (..., C). NOTE: this is the reference's
        `F.kl_div(p.log(), m)`, i.e. KL(m || p) per item, not the Jensen-Shannon terms; kept as is.
    position (the paper's prose): beta = 1 - JSD(p_mix, p_source) / log 2 with the true
        Jensen-Shannon divergence 1/2 [KL(p_mix || m) + KL(p_source || m)], which lies in [0, log 2]
        (the sum of the J above is unbounded), shape (..., 1).
    """
    _check_weights(weights)
    z_mix, z_source = _as_float("z_mix", z_mix, dtype), _as_float("z_source", z_source, dtype)
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
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """(1 + alpha) * z_target - beta * z_source over the C columns given, shape (..., C).

    Global and local scores are this one function, called on all N items or on the columns of
    R_T only, so every softmax, entropy, divergence and max is taken over the columns passed.
    Without source experts (ablation w/o SDE) beta = 0 and z_source, z_mix may be None.
    """
    _check_weights(weights)
    z_target = _as_float("z_target", z_target, dtype)
    scores = (1 + domain_confidence(z_target, weights, dtype)) * z_target
    if not source_experts:
        return scores
    if z_source is None or z_mix is None:
        raise ValueError("z_source and z_mix are required when source_experts is True")
    z_source, z_mix = _as_float("z_source", z_source, dtype), _as_float("z_mix", z_mix, dtype)
    _check_same_shape(z_target=z_target, z_source=z_source, z_mix=z_mix)
    return scores.sub_(transfer_reward(z_mix, z_source, weights, dtype) * z_source)


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
    positions whose decision the bound cannot settle are decided again in float64
    (model/certified.py): the same decisions at about half the cost.
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
    rule's global and local scores by compiled kernels (`certified.Fused`; worth their compile time
    at tens of thousands of items), the same decisions."""
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
    if not (certified_float32 and rule.weights == "elementwise" and float32):
        return {t: decide(z, z_source, z_mix, ranges[t], rule) for t, z in z_targets.items()}
    from model import certified  # the float32 form builds on this module's rule

    kernels = certified.FUSED if fused else certified.EAGER
    # the global scores' transfer half, shared by the targets (the local scores' is per target range)
    transfer = (kernels.transfer(z_source, z_mix)
                if rule.source_experts and rule.global_test and len(z_targets) > 1 else None)
    return {t: certified.decide_certified(z, z_source, z_mix, ranges[t], rule, transfer, kernels)
            for t, z in z_targets.items()}


def decide(z_target, z_source, z_mix, target_range: tuple[int, int], rule: DecodingRule,
           dtype: torch.dtype = torch.float64) -> Decision:
    """`decode`'s steps with the rule computed in `dtype`, on checked inputs: float64's decisions are
    the project's; float32 is what the reference code computes (benchmarks measure it)."""
    lo, hi = target_range
    R_T = slice(lo - 1, hi - 1)  # the columns of the target items
    shift = 1 if rule.reference_shift else 0

    def local(rows) -> torch.Tensor:
        # rows picks positions (a slice or an index tensor); [rows, R_T] copies only (P', |R_T|)
        return contrastive_scores(
            *(None if z is None else z[rows, R_T] for z in (z_target, z_source, z_mix)),
            weights=rule.weights,
            source_experts=rule.source_experts,
            dtype=dtype,
        )

    if not rule.global_test:
        items = local(slice(None)).argmax(dim=-1) + (lo + shift)
        convertible = torch.ones(len(items), dtype=torch.bool, device=items.device)
    else:
        G = contrastive_scores(z_target, z_source, z_mix, rule.weights, rule.source_experts, dtype)  # (P, N)
        items = G.argmax(dim=-1) + 1
        convertible = in_range(items, (lo, hi))
        if rule.local_scores and convertible.any():
            rows = convertible.nonzero().squeeze(1)
            G[rows, R_T] = local(rows)  # G is ours: update it in place rather than copy the rows
            items = G.argmax(dim=-1) + 1  # unchanged on the non-convertible rows
        del G
        items = items + shift
    return Decision(items=torch.where(in_range(items, (lo, hi)), items, 0), convertible=convertible)
