"""A slow, literal reading of docs/data.md's preparation, kept only to check the fast one.

Python sets, pandas and per-user lists, one step of docs/data.md after another,
nothing shared with `dataset/`: the two must agree byte for byte.
"""
from __future__ import annotations

import string

import pandas as pd


def _read(path) -> pd.DataFrame:
    df = pd.read_csv(path, sep="\t", dtype={"user_id:token": str, "item_id:token": str}, quoting=3)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


def _k_core(df: pd.DataFrame, user_core: int, item_core: int) -> pd.DataFrame:
    while True:
        users = df["user_id"].map(df["user_id"].value_counts())
        items = df["item_id"].map(df["item_id"].value_counts())
        kept = df[(users >= user_core) & (items >= item_core)]
        if len(kept) == len(df):
            return df
        df = kept


def _align(domains: list[pd.DataFrame], user_core: int, item_core: int) -> list[pd.DataFrame]:
    users = set.intersection(*(set(df["user_id"]) for df in domains))
    while True:
        domains = [_k_core(df[df["user_id"].isin(users)], user_core, item_core) for df in domains]
        remaining = set.intersection(*(set(df["user_id"]) for df in domains))
        if len(remaining) == len(users):
            return domains
        users = remaining


def _merge(domains: list[pd.DataFrame], max_len: int) -> pd.DataFrame:
    merged = pd.concat(domains, ignore_index=True)
    merged = merged.sort_values(["user_id", "timestamp"], kind="stable")
    return merged.groupby("user_id", sort=False).tail(max_len)


def _row(user: int, x: list[int]) -> str:
    return f"{user}\t{' '.join(map(str, x[:-1]))}\t{x[-1]}\n"


def reference_prepare(raw_files, user_core: int = 3, item_core: int = 3, max_len: int = 128) -> dict[str, str]:
    """File name suffix (`item`, `full.train`, ...) -> expected file text."""
    domains = [_read(p).drop_duplicates() for p in raw_files]
    domains = _align(domains, user_core, item_core)
    for d, df in enumerate(domains):
        df["item_id"] = df["item_id"] + "_" + string.ascii_uppercase[d]
        df["domain"] = d + 1
    merged = _merge(domains, max_len)
    domains = [merged[merged["domain"] == d + 1] for d in range(len(domains))]
    merged = _merge(_align(domains, user_core, item_core), max_len)

    item_tokens = []
    for d in range(len(raw_files)):
        item_tokens += sorted(set(merged.loc[merged["domain"] == d + 1, "item_id"]))
    item_id = {token: i + 1 for i, token in enumerate(item_tokens)}
    domain_of = {item_id[t]: string.ascii_uppercase.index(t.rsplit("_", 1)[1]) + 1 for t in item_tokens}
    user_id = {token: u + 1 for u, token in enumerate(sorted(set(merged["user_id"])))}

    files = {name: [] for name in ("full.train", "full.valid", "full.test")}
    for d in range(1, len(raw_files) + 1):
        for split in ("train", "valid", "test"):
            files[f"dom{d}.{split}"] = []
    sequences = {}
    for token, group in merged.groupby("user_id", sort=False):
        sequences[user_id[token]] = [item_id[t] for t in group["item_id"]]
    for user in sorted(sequences):
        s = sequences[user]
        n = len(s)
        if n >= 4:
            files["full.train"].append(_row(user, s[:-2]))
            files["full.valid"].append(_row(user, s[:-1]))
        elif n == 3:
            files["full.train"].append(_row(user, s[:-1]))
        if n >= 2:
            files["full.test"].append(_row(user, s))
            t, v, r = s, s[:-1], s[:-2]
            for d in range(1, len(raw_files) + 1):
                keep = lambda seq: [i for i in seq if domain_of[i] == d]  # noqa: E731
                if domain_of[t[-1]] == d and len(keep(t)) >= 2:
                    files[f"dom{d}.test"].append(_row(user, keep(t)))
                if v and domain_of[v[-1]] == d and len(keep(v)) >= 2:
                    files[f"dom{d}.valid"].append(_row(user, keep(v)))
                if len(keep(r)) >= 2:
                    files[f"dom{d}.train"].append(_row(user, keep(r)))
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    expected = {name: header + "".join(rows) for name, rows in files.items()}
    expected["item"] = "".join(t + "\n" for t in item_tokens)
    return expected
