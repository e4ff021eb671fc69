"""Synthetic multi-domain interaction logs with planted cross-domain structure.

Writes one RecBole atomic file per domain (`S1.inter`, `S2.inter`, ...) in the raw
format of docs/data.md, plus `correspondences.tsv`, the ground truth that says
which item of one domain "is" which item of another. Used to test the pipeline
without downloads and to benchmark the preparation at Amazon scale.

The planted structure (what the decoding evaluation measures):

- `n_concepts` concepts are split into `n_clusters` clusters (latent interests);
  each cluster is a ring of concepts. Every concept owns exactly one item in every
  domain: concept item of domain a <-> same concept's item of domain b is a planted
  correspondence. The other items of a domain are "noise" items with no
  counterpart, drawn with Zipf popularity.
- A user has `clusters_per_user` clusters, a subset of the domains (each kept with
  probability `domain_participation`) and a Dirichlet preference over that subset,
  scaled by `domain_weights`. Their sequence walks the concepts of their clusters:
  with probability `p_follow` to the ring successor, else a jump to a uniform
  concept of one of their clusters. Each step draws a domain from the preference
  and emits the concept's item in it, or, with probability `p_noise`, a noise item
  of that domain (the walk goes on underneath).
- So the concept of the NEXT item is predictable from the prefix alone (the ring
  successor of the last concept item), in whichever domain it is emitted: a
  decoder that replaces a source item by the target-domain item it predicts from
  the history can hit the planted counterpart about `p_follow` of the time after
  a concept item, while chance is one over the target domain's item count.

Item tokens are 12 hex digits from a bijective hash of (seed, domain, index), so
they reveal neither the domain nor concept-ness, and the prepared item ids (which
follow token order) are unrelated to the structure. Timestamps are integer seconds,
strictly increasing per user; ratings are integers 1..5 (unused downstream).

Generation is vectorised numpy over chunks of `_USERS_PER_CHUNK` users; each chunk
draws from its own seeded stream and appends its rows to every domain file, so
peak memory is bounded by the chunk, not the dataset. Rows are fixed-width per
column, so a chunk is formatted as one uint8 matrix and written with one call
(~2M rows/s on 2 cores, 0.7 GB peak at Amazon scale).

Presets, measured with `dataset.prepare.prepare_files` (core 3, 128 most recent):

- `BEST_SIZED`: the size of the paper's Amazon dataset after preparation.
  5.56M raw rows -> 40,475 users, 191,652 items, 1,735,487 interactions
  (2 s to generate, 6 s to prepare on 2 cores).
- `AMAZON_SCALE_RAW`: the raw size of the paper's four Amazon 2018 categories,
  94.3M rows: Books 50.4M, Electronics 21.6M, Sports 13.2M, Tools 9.1M; 72% of the
  users touch a single domain. Preparing it keeps about 41k users, 424k items and
  2.8M interactions, again close to the paper's dataset (`benchmarks/README.md`).

    python -m dataset.synthetic dataset/raw/synthetic --preset best_sized
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib

import numpy as np
import pandas as pd
from tqdm import tqdm

RAW_HEADER = b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
CORRESPONDENCES_FILE = "correspondences.tsv"
CORRESPONDENCES_HEADER = b"source_domain\tsource_item\ttarget_domain\ttarget_item\n"

# Each chunk draws from its own stream, so the chunk size is part of what a seed
# means: changing it changes the data. 50k users is ~1-3M rows for the presets.
_USERS_PER_CHUNK = 50_000
_TOKEN_HEX = 12  # 48-bit tokens: unique by construction (bijective hash below)
_BASE_TIME = 1_104_537_600  # 2005-01-01 UTC
_START_SPAN_S = 8 * 365 * 86_400  # users start uniformly over 8 years
_MAX_GAP_FACTOR = 30  # gaps are capped at 30 mean gaps: bounds the last timestamp
_TIME_DIGITS = 10  # every timestamp stays in [1e9, 1e10): fixed-width rows
_RATING_P = np.array([0.06, 0.06, 0.10, 0.20, 0.58])  # Amazon-like skew to 5 stars


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generator; the defaults give a small dataset (~4k rows per domain)."""

    n_users: int = 300  # (int) raw users, before any filtering
    n_domains: int = 3  # (int) domains S1..Sk, k >= 2
    items_per_domain: int | tuple[int, ...] = 60  # (int or one per domain) concept + noise items
    n_concepts: int = 40  # (int) concepts, each with one item in every domain
    n_clusters: int = 4  # (int) interest clusters = rings of concepts
    clusters_per_user: int = 1  # (int) clusters a user walks over
    seq_len_min: int = 20  # (int) shortest raw sequence over all domains
    seq_len_max: int = 60  # (int) longest raw sequence
    seq_len_power: float = 0.0  # (float) length density ~ L^-power: 0 uniform, 1 log-uniform
    p_follow: float = 0.8  # (float) probability of stepping to the ring successor
    p_noise: float = 0.2  # (float) probability that a step emits a noise item
    noise_zipf: float = 1.0  # (float) Zipf exponent of noise-item popularity
    domain_participation: float | tuple[float, ...] = 1.0  # (float or one per domain) P(user uses domain)
    domain_weights: tuple[float, ...] | None = None  # (floats or None=equal) relative domain sizes
    domain_alpha: float = 1.0  # (float) Dirichlet concentration of a user's domain preference
    mean_gap_s: float = 86_400.0  # (float) mean seconds between two interactions of a user
    seed: int = 0  # (int)

    def __post_init__(self):
        for name in ("items_per_domain", "domain_participation", "domain_weights"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (int, float)):
                # Lists (from YAML / Hydra) become tuples: hashable, and one type below.
                object.__setattr__(self, name, tuple(value))
        k = self.n_domains
        if k < 2:
            raise ValueError(f"n_domains must be >= 2, got {k}")
        for name in ("items_per_domain", "domain_participation", "domain_weights"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != k:
                raise ValueError(f"{name} has {len(value)} entries for {k} domains")
        if not 1 <= self.n_clusters <= self.n_concepts:
            raise ValueError("need 1 <= n_clusters <= n_concepts")
        if min(_per_domain(self.items_per_domain, k)) <= self.n_concepts:
            raise ValueError("every domain needs more items than n_concepts (noise items)")
        if not 1 <= self.seq_len_min <= self.seq_len_max:
            raise ValueError("need 1 <= seq_len_min <= seq_len_max")
        if not (0 <= self.p_follow <= 1 and 0 <= self.p_noise <= 1):
            raise ValueError("p_follow and p_noise are probabilities")
        if not all(0 < p <= 1 for p in _per_domain(self.domain_participation, k)):
            raise ValueError("domain_participation must lie in (0, 1]")
        if self.domain_weights is not None and min(self.domain_weights) <= 0:
            raise ValueError("domain_weights must be positive")
        last = _BASE_TIME + _START_SPAN_S + self.seq_len_max * (1 + _MAX_GAP_FACTOR * self.mean_gap_s)
        if last >= 10**_TIME_DIGITS:
            raise ValueError("seq_len_max * mean_gap_s too large for 10-digit timestamps")


def _per_domain(value, k: int) -> np.ndarray:
    return np.asarray(value if isinstance(value, tuple) else (value,) * k)


def domain_names(config: SyntheticConfig) -> list[str]:
    return [f"S{d + 1}" for d in range(config.n_domains)]


# Presets, calibrated against the preparation (module docstring). BEST_SIZED:
# participation 0.9 puts 66% of the users in all four domains, and log-uniform
# lengths on [12, 70] make most of the short ones miss 3 items in some domain, so
# about a quarter of the raw users survive; 20-concept rings, 2 per user.
BEST_SIZED = SyntheticConfig(
    n_users=170_000,
    n_domains=4,
    items_per_domain=(90_000, 55_000, 50_000, 45_000),
    n_concepts=25_000,
    n_clusters=1_250,
    clusters_per_user=2,
    seq_len_min=12,
    seq_len_max=70,
    seq_len_power=1.0,
    p_follow=0.8,
    p_noise=0.3,
    noise_zipf=0.3,
    domain_participation=0.9,
    domain_weights=(2.0, 1.2, 1.0, 0.8),
    domain_alpha=2.0,
)

# Amazon 2018 rating counts of the paper's categories: Books 51.3M, Electronics
# 21.0M, Sports 13.0M, Tools 9.0M; items 2.9M / 0.75M / 0.96M / 0.56M. Lengths are
# heavy-tailed (density ~ L^-2.2 on [1, 1000], mean 4.0), so most users are light
# and single-domain while the heavy ones use several domains: that is what leaves
# ~41k users after the all-domain 3-core, as on Amazon. Participation and
# domain_weights are tuned so the file sizes come out at the Amazon counts.
AMAZON_SCALE_RAW = SyntheticConfig(
    n_users=23_080_000,
    n_domains=4,
    items_per_domain=(2_900_000, 750_000, 960_000, 560_000),
    n_concepts=200_000,
    n_clusters=10_000,
    clusters_per_user=2,
    seq_len_min=1,
    seq_len_max=1_000,
    seq_len_power=2.2,
    p_follow=0.8,
    p_noise=0.5,
    noise_zipf=0.9,
    domain_participation=(0.96, 0.85, 0.78, 0.7),
    domain_weights=(1.0, 0.37, 0.22, 0.16),
)


def _hash48(x: np.ndarray) -> np.ndarray:
    """A bijection of [0, 2^48): odd multipliers and xor-shifts are each invertible."""
    mask = np.uint64((1 << 48) - 1)
    x = (x * np.uint64(0x9E3779B97F4B)) & mask
    x ^= x >> np.uint64(23)
    x = (x * np.uint64(0xBF58476D1CE5)) & mask
    x ^= x >> np.uint64(21)
    return x


def _hex_digits(x: np.ndarray, width: int) -> np.ndarray:
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64) * np.uint64(4)
    nibbles = (x[:, None] >> shifts) & np.uint64(15)
    return np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[nibbles]


def _decimal_digits(x: np.ndarray, width: int) -> np.ndarray:
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return (x[:, None] // powers % 10 + ord("0")).astype(np.uint8)


def _constant(text: str, n: int) -> np.ndarray:
    return np.broadcast_to(np.frombuffer(text.encode(), dtype=np.uint8), (n, len(text)))


def _tsv_bytes(columns: list[np.ndarray]) -> bytes:
    """Join fixed-width uint8 columns (n, w_i) into tab-separated lines."""
    n = columns[0].shape[0]
    out = np.empty((n, sum(c.shape[1] for c in columns) + len(columns)), dtype=np.uint8)
    at = 0
    for c in columns:
        out[:, at : at + c.shape[1]] = c
        at += c.shape[1]
        out[:, at] = ord("\t")
        at += 1
    out[:, -1] = ord("\n")
    return out.tobytes()


def _item_tokens(config: SyntheticConfig) -> list[np.ndarray]:
    """Per domain, the (n_items, 12) token bytes; index < n_concepts is a concept item."""
    # The seed only offsets the hash input, so tokens stay distinct across domains
    # (domain in bits 40..47, index below) while differing between seeds.
    salt = np.random.SeedSequence([config.seed, 0]).generate_state(1, np.uint64)[0]
    tokens = []
    for d, n in enumerate(_per_domain(config.items_per_domain, config.n_domains)):
        keys = (np.uint64(d) << np.uint64(40)) | np.arange(n, dtype=np.uint64)
        keys = (keys + salt) & np.uint64((1 << 48) - 1)
        tokens.append(_hex_digits(_hash48(keys), _TOKEN_HEX))
    return tokens


def _noise_cdfs(config: SyntheticConfig) -> list[np.ndarray]:
    cdfs = []
    for n in _per_domain(config.items_per_domain, config.n_domains):
        weights = np.arange(1, n - config.n_concepts + 1, dtype=np.float64) ** -config.noise_zipf
        cdfs.append(np.cumsum(weights) / weights.sum())
    return cdfs


# Lengths are floor(x), x with density ~ x^-power on [min, max + 1): power 0 is
# uniform, 1 log-uniform, 2 a long tail of heavy users over many short ones.
def _length_quantile(config: SyntheticConfig, u: np.ndarray) -> np.ndarray:
    a, b, p = config.seq_len_min, config.seq_len_max + 1, config.seq_len_power
    if p == 1.0:
        return a * (b / a) ** u
    return (a ** (1 - p) + u * (b ** (1 - p) - a ** (1 - p))) ** (1 / (1 - p))


def _length_cdf(config: SyntheticConfig, x: np.ndarray) -> np.ndarray:
    a, b, p = config.seq_len_min, config.seq_len_max + 1, config.seq_len_power
    if p == 1.0:
        return np.log(x / a) / np.log(b / a)
    return (x ** (1 - p) - a ** (1 - p)) / (b ** (1 - p) - a ** (1 - p))


def _sample_lengths(config: SyntheticConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    x = _length_quantile(config, rng.random(n))
    return np.clip(np.floor(x).astype(np.int64), config.seq_len_min, config.seq_len_max)


def expected_rows(config: SyntheticConfig) -> float:
    """Expected raw rows over all domains: n_users times the mean sequence length."""
    lengths = np.arange(config.seq_len_min, config.seq_len_max + 1, dtype=np.float64)
    p = _length_cdf(config, lengths + 1) - _length_cdf(config, lengths)
    return config.n_users * float(lengths @ p)


def _domain_preferences(config: SyntheticConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, k) unnormalised cumulative preferences; zero width = domain not used."""
    k = config.n_domains
    uses = rng.random((n, k)) < _per_domain(config.domain_participation, k)
    # A user with no domain at all would vanish; give them one, by domain size.
    weights = np.ones(k) if config.domain_weights is None else np.asarray(config.domain_weights)
    lonely = np.flatnonzero(~uses.any(axis=1))
    uses[lonely, rng.choice(k, size=lonely.size, p=weights / weights.sum())] = True
    return np.cumsum(rng.gamma(config.domain_alpha, size=(n, k)) * weights * uses, axis=1)


def _simulate_chunk(config: SyntheticConfig, rng: np.random.Generator, n: int, cdfs):
    """Interactions of n users as flat arrays, grouped by user in time order."""
    lengths = _sample_lengths(config, rng, n)
    cum_pref = _domain_preferences(config, rng, n)
    clusters = rng.integers(config.n_clusters, size=(n, config.clusters_per_user))

    user = np.repeat(np.arange(n), lengths)
    total = user.size
    first = np.cumsum(lengths) - lengths
    step = np.arange(total) - first[user]

    # The walk: between two jumps the position advances by one on the ring, so
    # the concept at a step is (jump target + steps since the jump) mod ring size.
    jump = (rng.random(total) >= config.p_follow) | (step == 0)
    jump_at = np.flatnonzero(jump)
    segment = np.cumsum(jump) - 1
    seg_cluster = clusters[user[jump_at], rng.integers(config.clusters_per_user, size=jump_at.size)]
    ring_start = np.arange(config.n_clusters + 1) * config.n_concepts // config.n_clusters
    ring_size = np.diff(ring_start)
    seg_pos = (rng.random(jump_at.size) * ring_size[seg_cluster]).astype(np.int64)
    cluster = seg_cluster[segment]
    pos = (seg_pos[segment] + np.arange(total) - jump_at[segment]) % ring_size[cluster]
    item = ring_start[cluster] + pos

    row_pref = cum_pref[user]
    draw = rng.random(total) * row_pref[:, -1]
    domain = np.minimum((draw[:, None] >= row_pref).sum(axis=1), config.n_domains - 1)

    noise = rng.random(total) < config.p_noise
    noise_u = rng.random(total)
    for d, cdf in enumerate(cdfs):
        at = noise & (domain == d)
        item[at] = config.n_concepts + np.minimum(np.searchsorted(cdf, noise_u[at]), cdf.size - 1)

    rating = rng.choice(5, size=total, p=_RATING_P) + 1
    gap = 1 + np.minimum(rng.exponential(config.mean_gap_s, total), _MAX_GAP_FACTOR * config.mean_gap_s)
    gap = gap.astype(np.int64)
    gap[first] = 0
    elapsed = np.cumsum(gap)
    start = _BASE_TIME + rng.integers(_START_SPAN_S, size=n)
    timestamp = start[user] + elapsed - elapsed[first][user]
    return user, domain, item, rating, timestamp


def _user_tokens(users: np.ndarray, n_users: int) -> np.ndarray:
    """`u000123`: zero-padded so the column is fixed-width (at least 6 digits)."""
    digits = _decimal_digits(users, max(6, len(str(n_users - 1))))
    return np.concatenate([_constant("u", users.size), digits], axis=1)


def _write_chunk(files, config, tokens, offset, arrays) -> None:
    user, domain, item, rating, timestamp = arrays
    for d, f in enumerate(files):
        at = np.flatnonzero(domain == d)
        f.write(_tsv_bytes([
            _user_tokens(offset + user[at], config.n_users),
            tokens[d][item[at]],
            _decimal_digits(rating[at], 1),
            _decimal_digits(timestamp[at], _TIME_DIGITS),
        ]))


def _correspondence_bytes(config: SyntheticConfig, tokens) -> bytes:
    """Every ordered pair of domains, concept by concept (source order, then target)."""
    names, n = domain_names(config), config.n_concepts
    blocks = [CORRESPONDENCES_HEADER]
    for a, source in enumerate(names):
        for b, target in enumerate(names):
            if a != b:
                blocks.append(_tsv_bytes([
                    _constant(source, n), tokens[a][:n], _constant(target, n), tokens[b][:n],
                ]))
    return b"".join(blocks)


def generate_raw(out_dir: pathlib.Path, config: SyntheticConfig, progress: bool = False) -> list[pathlib.Path]:
    """Write `S1.inter`.. and `correspondences.tsv` into out_dir; return the domain files in order."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    finals = [out_dir / f"{name}.inter" for name in domain_names(config)]
    finals.append(out_dir / CORRESPONDENCES_FILE)
    # Temporary names, renamed only when all is written: no half-written files.
    temps = [p.with_name(f".{p.name}.{os.getpid()}.tmp") for p in finals]
    tokens = _item_tokens(config)
    cdfs = _noise_cdfs(config)
    try:
        temps[-1].write_bytes(_correspondence_bytes(config, tokens))
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(open(p, "wb")) for p in temps[:-1]]
            for f in files:
                f.write(RAW_HEADER)
            bar = stack.enter_context(tqdm(total=config.n_users, unit="user", unit_scale=True, disable=not progress))
            for chunk, offset in enumerate(range(0, config.n_users, _USERS_PER_CHUNK)):
                n = min(_USERS_PER_CHUNK, config.n_users - offset)
                rng = np.random.default_rng([config.seed, 1, chunk])
                _write_chunk(files, config, tokens, offset, _simulate_chunk(config, rng, n, cdfs))
                bar.update(n)
        for temp, final in zip(temps, finals):
            os.replace(temp, final)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
    return finals[:-1]


def read_correspondences(path: pathlib.Path) -> pd.DataFrame:
    """The ground truth as strings: source_domain, source_item, target_domain, target_item."""
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def planted_counterparts(raw_dir: pathlib.Path, item_tokens: list[str], config: SyntheticConfig,
                         target: int) -> dict[int, int]:
    """Prepared item id of each planted source item -> id of its true counterpart in domain `target`.

    `item_tokens` is the prepared `NAME.item` (id i at index i - 1); pairs whose items
    the preparation filtered out are left out.
    """
    names = domain_names(config)
    suffix = {name: f"_{chr(ord('A') + d)}" for d, name in enumerate(names)}
    item_id = {token: i + 1 for i, token in enumerate(item_tokens)}
    truth = read_correspondences(pathlib.Path(raw_dir) / CORRESPONDENCES_FILE)
    truth = truth[truth["target_domain"] == names[target - 1]]
    source = (truth["source_item"] + truth["source_domain"].map(suffix)).map(item_id)
    counterpart = (truth["target_item"] + truth["target_domain"].map(suffix)).map(item_id)
    kept = source.notna() & counterpart.notna()
    return dict(zip(source[kept].astype(int), counterpart[kept].astype(int)))


PRESETS = {"small": SyntheticConfig(), "best_sized": BEST_SIZED, "amazon_scale_raw": AMAZON_SCALE_RAW}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = dataclasses.replace(PRESETS[args.preset], seed=args.seed)
    for path in generate_raw(args.out_dir, config, progress=True):
        print(path)


if __name__ == "__main__":
    main()

