r"""Nearest-neighbour indexes over the normal bank's last-stage tokens (the ``knn`` mode).

The ``knn`` mode (AnomalyDINO) scores a query patch token :math:`q` by
:math:`1 - \max_{b \in \mathcal{B}} \cos(q, b)` over the foreground tokens :math:`b` of every normal
slice. ``knn_index`` says how the maximum is found:

``exact`` (default): faiss brute-force inner-product search (``faiss.knn``, the computation of
``IndexFlatIP.search``) over every token held as float32, the true maximum. A bank larger than
:data:`MAX_INDEX_BYTES` (as float32) is searched chunk by chunk of :data:`CHUNK_ROWS` tokens, so
memory stays bounded.

``ivf``: faiss ``IndexIVFFlat`` (inner product). A coarse quantiser of
:math:`n_\mathrm{list} = \mathrm{round}(4\sqrt{n})` centroids (at most :math:`n / 39`) for a bank of
:math:`n` tokens is trained by k-means (faiss, 10 iterations) on a seeded sample of
:math:`\min(n, 64\,n_\mathrm{list})` tokens; every token is stored, in full float32, in the list of
its most similar centroid. A query token is compared with every token of the
:math:`n_\mathrm{probe} = \min(n_\mathrm{list}, \max(16, \lceil n_\mathrm{list} / 32 \rceil))` lists
whose centroids are most similar to it. The lists are searched list by list: one matrix product
per list with all the query tokens of the call that probe it (the candidates, and so the result, of
faiss's own ``IndexIVFFlat.search`` at the same ``nprobe``, several times faster for the hundreds of
tokens a batch of slices brings).

``hnsw``: faiss ``IndexHNSWFlat`` (inner product), :data:`HNSW_M` neighbours per node,
``efConstruction`` :data:`HNSW_EF_CONSTRUCTION`, ``efSearch`` :data:`HNSW_EF_SEARCH`; tokens stored in
full float32.

What is approximate: ``ivf`` and ``hnsw`` may miss a query token's nearest normal token and return
its cosine to a less similar one. Every returned value is the true cosine to a real normal token, so
an approximate score is never below the exact one: a miss can only raise a patch's anomaly score.
The parameters were chosen by measuring recall@1 against ``exact`` (see ``docs/method.md`` and
``benchmarks/knn_index.py``).

Excluding the query's own subject (calibration, the only search that excludes tokens): ``exact``
searches each run of consecutive allowed tokens (a subject's slices are stored together) with the
same brute-force search; a faiss ID selector would be exact too, but faiss then scans row by row
without the matrix product, over ten times slower. ``ivf`` drops the excluded ids from each
probed list; a query token whose probed lists hold only excluded tokens is searched exactly.
``hnsw`` falls back to the exact search, over the float32 tokens the graph stores (no second copy):
faiss's filtered graph search (``SearchParametersHNSW`` with an ID selector) walks through the
excluded nodes, and when a subject's own tokens are the whole neighbourhood of a query (adjacent
slices of one volume) it stops at a poor allowed token or none: on the constructed case of
``Testing/methods/test_knn_index.py`` (half the bank is the query's subject, the other subjects far away)
its recall@1 is 0.02 at efSearch 64 and 0.18 at 1024, which would inflate the calibrated threshold.

Memory: ``ivf`` and ``hnsw`` hold every token as float32 in memory (plus ids or graph links). When
that estimate exceeds :data:`MAX_INDEX_BYTES`, the approximate index is not built: the bank is
searched exactly, chunk by chunk, and a warning says so.

Persistence: ``ivf`` and ``hnsw`` indexes take minutes to build on a large bank, so they are written
next to the bank, in its cache folder: ``knn_<kind>_<hash>.faiss`` (``faiss.write_index``) and
``knn_<kind>_<hash>.json`` (its key, byte count and BLAKE2b digest). The hash and the key cover the
index format, the kind and its parameters, the bank's seed, token count, content fingerprint and
the checksum of its ``tokens.npy``, so an index is never used with another bank. The file is
written under a temporary name, its bytes on disk are compared with the bytes faiss produced, then
it is renamed; the JSON is written last. On loading, the key must match, the digest of the file
must match the JSON's and the index must hold the bank's token count and dimension; otherwise it is
rebuilt (with a warning). Older indexes of the same kind in the folder are removed. A folder that
cannot be written (read-only cache) keeps the index in memory only. ``exact`` is never written
(building it is a copy of the tokens).

Determinism: the k-means sample and initialisation are seeded with the bank's seed and faiss's
HNSW level generator has a fixed seed; both indexes are built with one faiss thread, so the same
bank gives the same index, byte for byte, on a given machine and faiss build, and the same scores.
Searching is deterministic.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.atomic import atomic_path, write_text_atomic
from ..core.digest import file_digest
from ..core.errors import HiMatchADError
from ..core.progress import Reporter

KNN_INDEXES = ("exact", "ivf", "hnsw")


#: Version of the persisted index files (part of their key).
INDEX_FORMAT = 1


#: Largest in-memory index (float32 tokens plus the index's own structures); beyond it the bank is
#: searched exactly, chunk by chunk.
MAX_INDEX_BYTES = 3 * 2**30


#: Tokens per chunk when adding to an index or searching a large bank exactly.
CHUNK_ROWS = 262_144


IVF_LIST_FACTOR = 4.0  # nlist = round(4 sqrt(n))


IVF_MIN_POINTS_PER_LIST = 39  # faiss's minimum training points per centroid


IVF_TRAIN_POINTS_PER_LIST = 64


IVF_MIN_PROBE = 16


IVF_PROBE_DIVISOR = 32  # nprobe = ceil(nlist / 32), at least IVF_MIN_PROBE


HNSW_M = 48


HNSW_EF_CONSTRUCTION = 60


HNSW_EF_SEARCH = 64


#: Tokens added to an HNSW graph between two progress reports (and cancellation checks).
HNSW_ADD_ROWS = 16_384


def check_knn_index(value) -> str:
    """The index kind, lower-cased; :class:`HiMatchADError` for anything but exact, ivf or hnsw."""
    kind = str(value).lower()
    if kind not in KNN_INDEXES:
        raise HiMatchADError(f"unknown kNN index '{value}'; choose one of {', '.join(KNN_INDEXES)}")
    return kind


def index_params(kind: str, n: int) -> dict:
    """Parameters of an index of ``kind`` over ``n`` tokens (the rules in the module docstring)."""
    if kind == "ivf":
        nlist = int(max(1, min(round(IVF_LIST_FACTOR * math.sqrt(n)), n // IVF_MIN_POINTS_PER_LIST)))
        nprobe = int(min(nlist, max(IVF_MIN_PROBE, math.ceil(nlist / IVF_PROBE_DIVISOR))))
        return {"nlist": nlist, "nprobe": nprobe, "train_points": int(min(n, IVF_TRAIN_POINTS_PER_LIST * nlist)), "kmeans_iterations": 10}
    if kind == "hnsw":
        return {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}
    return {}


def estimated_bytes(kind: str, n: int, d: int, params: dict) -> int:
    """Memory of an in-memory index of ``kind`` (float32 tokens plus ids, centroids or links)."""
    vectors = n * d * 4
    if kind == "ivf":
        return vectors + n * 8 + params["nlist"] * d * 4
    if kind == "hnsw":
        # level 0 keeps 2M links per node, upper levels (1/M of the nodes, geometrically) M each
        return vectors + n * (2 * params["M"] * 4 + 16) + int(n / (params["M"] - 1)) * params["M"] * 4
    return vectors


def keep_selector(keep: np.ndarray):
    """faiss selector of the rows where ``keep`` is True, and the bitmap it reads (faiss holds a
    pointer to it)."""
    import faiss

    bitmap = np.packbits(np.asarray(keep, bool), bitorder="little")
    return faiss.IDSelectorBitmap(bitmap), bitmap


def kept_runs(keep: Optional[np.ndarray], n: int) -> list:
    """``[(start, end), ...]``: the runs of consecutive rows where ``keep`` is True (all ``n`` rows
    when ``keep`` is None). A subject's slices are stored together, so there are few."""
    if keep is None:
        return [(0, n)] if n else []
    edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(keep, np.int8), [0]])))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def flat_max_sim(xb: np.ndarray, q: np.ndarray, keep: Optional[np.ndarray] = None) -> np.ndarray:
    """Exact max inner product of each row of ``q`` with the rows of the float32 matrix ``xb`` where
    ``keep`` (``-inf`` where none is kept). Each run of kept rows is one faiss brute-force search
    (a matrix product), not a search filtered row by row with an ID selector, which faiss runs
    without the matrix product and is over ten times slower."""
    import faiss

    best = np.full(q.shape[0], -np.inf, dtype=np.float32)
    for a, b in kept_runs(keep, xb.shape[0]):
        D, _ = faiss.knn(q, xb[a:b], 1, metric=faiss.METRIC_INNER_PRODUCT)
        np.maximum(best, D[:, 0], out=best)
    return best


def _tokens_f32(tokens, a: int, b: int) -> np.ndarray:
    return np.ascontiguousarray(tokens[a:b], dtype=np.float32)


def chunked_max_sim(tokens, q: np.ndarray, keep: Optional[np.ndarray] = None, chunk_rows: Optional[int] = None) -> np.ndarray:
    """:func:`flat_max_sim` over ``tokens`` (any float dtype, e.g. the bank's float16 memory map)
    read ``chunk_rows`` rows at a time, so memory stays bounded by one float32 chunk."""
    chunk_rows = CHUNK_ROWS if chunk_rows is None else int(chunk_rows)
    best = np.full(q.shape[0], -np.inf, dtype=np.float32)
    for a in range(0, tokens.shape[0], chunk_rows):
        b = min(tokens.shape[0], a + chunk_rows)
        if keep is not None and not keep[a:b].any():
            continue
        np.maximum(best, flat_max_sim(_tokens_f32(tokens, a, b), q, None if keep is None else keep[a:b]), out=best)
    return best


class _Searcher:
    """One index over the bank's tokens: ``max_sim(q, keep)`` -> (n,) max inner products."""

    kind = "exact"

    def __init__(self, tokens, params: Optional[dict] = None):
        self.tokens = tokens
        self.params = dict(params or {})
        self.info: dict = {"kind": self.kind, "params": self.params}

    def max_sim(self, q: np.ndarray, keep: Optional[np.ndarray] = None) -> np.ndarray:
        raise NotImplementedError


class ChunkedExact(_Searcher):
    """Exact search chunk by chunk, never holding more than one chunk (large banks)."""

    def max_sim(self, q, keep=None):
        return chunked_max_sim(self.tokens, q, keep)


class FlatExact(_Searcher):
    """Exact search over every token held as one float32 matrix ``xb``."""

    def __init__(self, tokens, xb: np.ndarray):
        super().__init__(tokens)
        self.xb = xb

    def max_sim(self, q, keep=None):
        return flat_max_sim(self.xb, q, keep)


class IvfSearch(_Searcher):
    """``IndexIVFFlat`` searched list by list (see the module docstring)."""

    kind = "ivf"
    query_block = 8192  # query rows assigned to lists at a time

    def __init__(self, tokens, params, index):
        import faiss

        super().__init__(tokens, params)
        self.index = index
        ivf = faiss.extract_index_ivf(index)
        self.quantizer = ivf.quantizer
        inv = ivf.invlists
        d = ivf.d
        self.lists = []  # (float32 tokens, int64 ids) of each list: views of the index's memory
        for li in range(ivf.nlist):
            size = inv.list_size(li)
            if size == 0:
                self.lists.append((np.zeros((0, d), np.float32), np.zeros(0, np.int64)))
                continue
            codes = faiss.rev_swig_ptr(inv.get_codes(li), size * d * 4).view(np.float32).reshape(size, d)
            ids = faiss.rev_swig_ptr(inv.get_ids(li), size)
            self.lists.append((codes, ids))

    def max_sim(self, q, keep=None):
        nprobe = int(self.params["nprobe"])
        best = np.full(q.shape[0], -np.inf, dtype=np.float32)
        for a in range(0, q.shape[0], self.query_block):
            qb = q[a : a + self.query_block]
            _, lists = self.quantizer.search(qb, nprobe)
            lists = lists.ravel()
            rows = np.repeat(np.arange(qb.shape[0]), nprobe)
            valid = lists >= 0
            order = np.argsort(lists[valid], kind="stable")
            lists, rows = lists[valid][order], rows[valid][order]
            cuts = np.flatnonzero(np.diff(lists)) + 1
            out = best[a : a + qb.shape[0]]
            for s, e in zip(np.r_[0, cuts], np.r_[cuts, lists.size]):
                codes, ids = self.lists[lists[s]]
                if keep is not None and codes.shape[0]:
                    allowed = keep[ids]
                    if not allowed.all():
                        codes = codes[allowed]
                if codes.shape[0] == 0:
                    continue
                r = rows[s:e]
                out[r] = np.maximum(out[r], (qb[r] @ codes.T).max(1))
        missing = np.flatnonzero(~np.isfinite(best))  # every probed token excluded: search exactly
        if missing.size:
            best[missing] = chunked_max_sim(self.tokens, q[missing], keep)
        return best


class HnswSearch(_Searcher):
    """``IndexHNSWFlat``; a search that excludes rows is exact, over the graph's stored tokens (see
    the module docstring)."""

    kind = "hnsw"

    def __init__(self, tokens, params, index):
        import faiss

        super().__init__(tokens, params)
        self.index = index
        storage = faiss.downcast_index(index.storage)  # an IndexFlat of the float32 tokens
        xb = faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * storage.d).reshape(storage.ntotal, storage.d)
        self.exact = FlatExact(tokens, xb)

    def max_sim(self, q, keep=None):
        import faiss

        if keep is not None:
            return self.exact.max_sim(q, keep)
        D, _ = self.index.search(q, 1, params=faiss.SearchParametersHNSW(efSearch=int(self.params["efSearch"])))
        return D[:, 0].copy()


# ------------------------------------------------------------------ building and persistence
@contextlib.contextmanager
def _single_threaded():
    """Context in which faiss uses one thread (a reproducible build), restored afterwards."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def build_index(tokens, kind: str, params: dict, seed: int = 0, reporter: Optional[Reporter] = None):
    """Build the faiss index of ``kind`` (``ivf`` or ``hnsw``) over ``tokens`` (rows, any float
    dtype, read chunk by chunk); progress and cancellation through ``reporter``."""
    import faiss

    reporter = reporter or Reporter()
    n, d = tokens.shape
    msg = f"Building the kNN index ({kind})"
    with _single_threaded():
        if kind == "ivf":
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, int(params["nlist"]), faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = int(seed)
            index.cp.niter = int(params["kmeans_iterations"])
            rows = np.sort(np.random.default_rng(seed).choice(n, int(params["train_points"]), replace=False))
            reporter(msg, 0, n + 1)
            index.train(np.ascontiguousarray(tokens[rows], dtype=np.float32))
            step = CHUNK_ROWS
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(params["efConstruction"])
            index.hnsw.efSearch = int(params["efSearch"])
            step = HNSW_ADD_ROWS
        else:
            raise ValueError(f"no index to build for '{kind}'")
        reporter(msg, 1 if kind == "ivf" else 0, n + 1)
        for a in range(0, n, step):
            index.add(_tokens_f32(tokens, a, a + step))
            reporter(msg, min(n, a + step) + 1, n + 1)
    return index


def index_key(bank, kind: str, params: dict) -> dict:
    """What a persisted index must have been built from: the bank's tokens and these parameters."""
    m = bank.manifest
    return {
        "format": INDEX_FORMAT,
        "kind": kind,
        "params": params,
        "seed": int(m["settings"].get("seed", 0)),
        "n_tokens": int(bank.tokens.shape[0]),
        "dim": int(bank.tokens.shape[1]),
        "content": m.get("content"),
        "tokens_checksum": (m.get("checksums") or {}).get("tokens.npy"),
    }


def index_paths(bank, kind: str, key: dict) -> tuple[Path, Path]:
    """(index file, its JSON record) in the bank's folder."""
    faiss_path = bank.extra_path(f"knn_{kind}", key, ".faiss")
    return faiss_path, faiss_path.with_suffix(".json")


def write_index(index, path: Path, record: dict) -> dict:
    """Write ``index`` to ``path`` atomically and verified, then its JSON record (``record`` plus
    ``bytes`` and ``digest``) beside it. Returns the record written."""
    import faiss

    h = hashlib.blake2b(digest_size=16)
    size = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            def write(chunk: bytes) -> int:
                nonlocal size
                fh.write(chunk)
                h.update(chunk)
                size += len(chunk)
                return len(chunk)

            faiss.write_index(index, faiss.PyCallbackIOWriter(write))
            fh.flush()
            os.fsync(fh.fileno())

        if os.path.getsize(tmp) != size or file_digest(tmp) != h.hexdigest():
            raise OSError(f"the index written to {path} differs from the index in memory (disk full?)")
    out = {**record, "bytes": size, "digest": h.hexdigest()}
    write_text_atomic(path.with_suffix(".json"), json.dumps(out, indent=1))
    return out


def read_index(path: Path, record: dict, key: dict):
    """Read a persisted index and check it against ``record`` (its JSON) and ``key`` (what the bank
    needs); ``ValueError`` saying why it cannot be used."""
    import faiss

    if record.get("key") != key:
        raise ValueError("it was built from another bank or with other parameters")
    h = hashlib.blake2b(digest_size=16)
    size = 0
    with open(path, "rb") as fh:
        def read(n: int) -> bytes:
            nonlocal size
            chunk = fh.read(n)
            h.update(chunk)
            size += len(chunk)
            return chunk

        try:
            index = faiss.read_index(faiss.PyCallbackIOReader(read))
        except RuntimeError as exc:
            raise ValueError(f"faiss cannot read it ({str(exc).strip().splitlines()[-1]})") from exc
        rest = fh.read(1 << 20)
        while rest:
            h.update(rest)
            size += len(rest)
            rest = fh.read(1 << 20)
    if size != record.get("bytes") or h.hexdigest() != record.get("digest"):
        raise ValueError("its bytes differ from those recorded when it was written (damaged file)")
    want = faiss.IndexIVFFlat if key["kind"] == "ivf" else faiss.IndexHNSWFlat  # read_index returns the concrete class
    if not isinstance(index, want) or index.ntotal != key["n_tokens"] or index.d != key["dim"] or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError("it does not hold this bank's tokens")
    return index


def _remove_older(bank, kind: str, keep: Path) -> None:
    for p in bank.root.glob(f"knn_{kind}_*"):
        if p.suffix in (".faiss", ".json") and p.with_suffix(".faiss") != keep:
            try:
                p.unlink()
            except OSError:
                pass


def open_index(bank, kind: str, reporter: Optional[Reporter] = None, max_bytes: Optional[int] = None) -> _Searcher:
    """The searcher of ``kind`` over ``bank``'s tokens: kept in memory with the bank (one per kind),
    loaded from the bank folder, or built (and persisted for ``ivf`` and ``hnsw``).

    ``info`` of the returned searcher records the kind, parameters, bytes, how it was obtained
    (``"built"``, ``"loaded"``, ``"memory"``), the seconds it took and, in ``"warning"``, why it is not
    the requested index when the bank is too large for it (``max_bytes``, default
    :data:`MAX_INDEX_BYTES`).
    """

    kind = check_knn_index(kind)
    cache_key = f"knn_index_{kind}"
    if cache_key in bank._cache:
        return bank._cache[cache_key]
    reporter = reporter or Reporter()
    tokens = bank.tokens
    n, d = tokens.shape
    t0 = time.perf_counter()
    params = index_params(kind, n)
    need = estimated_bytes(kind, n, d, params)
    max_bytes = MAX_INDEX_BYTES if max_bytes is None else int(max_bytes)
    if need > max_bytes:
        searcher = ChunkedExact(tokens)
        if kind != "exact":
            searcher.info["warning"] = (
                f"the {kind} kNN index of this bank would need {need / 2**30:.1f} GiB of memory (more than "
                f"{max_bytes / 2**30:.1f} GiB): the bank is searched exactly, chunk by chunk, instead"
            )
        searcher.info.update(how="chunked", bytes=0)
    elif kind == "exact":
        xb = np.empty((n, d), np.float32)
        for a in range(0, n, CHUNK_ROWS):
            xb[a : a + CHUNK_ROWS] = tokens[a : a + CHUNK_ROWS]
        searcher = FlatExact(tokens, xb)
        searcher.info.update(how="memory", bytes=need)
    else:
        index, how = _load_or_build(bank, kind, params, reporter)
        searcher = (IvfSearch if kind == "ivf" else HnswSearch)(tokens, params, index)
        searcher.info.update(how=how, bytes=need)
    searcher.info["seconds"] = round(time.perf_counter() - t0, 3)
    bank._cache[cache_key] = searcher
    return searcher


def _load_or_build(bank, kind: str, params: dict, reporter: Reporter):
    key = index_key(bank, kind, params)
    path, record_path = index_paths(bank, kind, key)
    if path.exists() and record_path.exists():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            return read_index(path, record, key), "loaded"
        except (OSError, ValueError) as exc:
            warnings.warn(f"the {kind} kNN index {path} cannot be used ({exc}); rebuilding it")
    t = time.perf_counter()
    index = build_index(bank.tokens, kind, params, seed=key["seed"], reporter=reporter)
    record = {"key": key, "build_seconds": round(time.perf_counter() - t, 3)}
    try:
        write_index(index, path, record)
        _remove_older(bank, kind, path)
    except OSError as exc:
        warnings.warn(f"the {kind} kNN index could not be saved in {bank.root} ({exc}); it is kept in memory only")
    return index, "built"
