"""ACDT: MovieLens-100K split into genre domains, built from the copy RecBole's wheel ships.

A movie belongs to the first of the configured genres (by default Action,
Comedy, Drama, Thriller, in that priority) found among its `class` genres;
movies with none of them are dropped with their ratings. Each domain's raw
file holds the ml-100k rating lines of its movies, verbatim and in file order.
No download is involved.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from data.files import DataError, write_text_atomic

GENRES = ("Action", "Comedy", "Drama", "Thriller")


def ml100k_dir() -> Path:
    import recbole

    return Path(recbole.__file__).parent / "dataset_example" / "ml-100k"


def movie_domains(item_file: Path, genres: list[str]) -> pd.Series:
    """Index: movie token; value: 0-based domain index, or -1 when no genre matches."""
    movies = pd.read_csv(item_file, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    movie_genres = movies["class:token_seq"].str.split(" ")
    domain = np.full(len(movies), -1)
    # Walk the genres from last to first so that the first matching genre wins.
    for d in reversed(range(len(genres))):
        domain[movie_genres.map(lambda gs, g=genres[d]: g in gs).to_numpy()] = d
    return pd.Series(domain, index=movies["item_id:token"])


def write_acdt_raw(raw_dir: Path, genres: list[str] = GENRES) -> list[Path]:
    """Write `raw_dir/GENRE.inter` for each genre (the domain order) and return the paths."""
    source = ml100k_dir()
    known = set(pd.read_csv(source / "ml-100k.item", sep="\t", dtype=str)["class:token_seq"].str.split(" ").explode())
    unknown = [g for g in genres if g not in known]
    if unknown:
        raise DataError(f"ACDT domains must be ml-100k genres; unknown: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    domains = movie_domains(source / "ml-100k.item", list(genres))
    lines = (source / "ml-100k.inter").read_text(encoding="utf-8").split("\n")
    header, body = lines[0], [line for line in lines[1:] if line]
    ratings = pd.Series(body)
    rating_domain = domains.reindex(ratings.str.split("\t", n=2).str[1]).fillna(-1).to_numpy()
    paths = []
    for d, genre in enumerate(genres):
        path = Path(raw_dir) / f"{genre}.inter"
        write_text_atomic(path, header + "\n" + "".join(line + "\n" for line in ratings[rating_domain == d]))
        paths.append(path)
    return paths
