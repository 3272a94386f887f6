"""The data-check toolkit every dataset module builds on: pairing images with their labels, seeded
subsets, checking every sample (in threads, with progress), skipping bad samples or stopping with
one error that lists them, and the listing itself.

A dataset module keeps only its layout and value rules (which folders, which suffixes, what a
valid label file holds) and hands them to these functions; what a check found and skipped goes
into the run's record the same way for every dataset.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np

from ..errors import FourmEvalError

T = TypeVar("T")
Problem = tuple[str, str]  # (file or sample, reason)


class DatasetError(FourmEvalError):
    """The dataset on disk does not have the expected layout or content."""


def problem_listing(bad: Sequence[Problem], show: int = 10) -> str:
    """The first ``show`` (file, reason) problems, one indented line each, then how many more."""
    listing = "\n  ".join(f"{f}: {r}" for f, r in bad[:show])
    more = f"\n  ... and {len(bad) - show} more" if len(bad) > show else ""
    return f"  {listing}{more}"


class ImageCheckCache:
    """What decoding each image of one dataset root found, by file (path relative to the root, size,
    modification time in ns), so that a second check of an unchanged dataset decodes nothing: an image
    whose size or mtime changed (a touched or replaced file) is decoded again. Kept in
    ``<cache>/image-checks/<sha256 of the root>.json`` (``fourm_eval.paths.cache_dir``); only a decode
    result is cached, never a layout or label check. Counts: ``decoded`` and ``cached``."""

    def __init__(self, root: Path) -> None:
        import hashlib
        import json
        import threading

        from ..paths import cache_dir

        self.root = Path(root).resolve()
        self.file = cache_dir() / "image-checks" / (hashlib.sha256(str(self.root).encode()).hexdigest()[:24] + ".json")
        self.lock = threading.Lock()
        self.decoded = self.cached = 0
        try:
            data = json.loads(self.file.read_text())
            self.entries = data["files"] if data.get("root") == str(self.root) else {}
        except (OSError, ValueError, KeyError, TypeError):
            self.entries = {}

    def lookup(self, path: Path) -> tuple[str | None, Any]:
        """(key, cached result or a miss marker) for ``path`` under the root; key None outside it."""
        try:
            rel = str(Path(path).resolve().relative_to(self.root))
            st = os.stat(path)
        except (ValueError, OSError):
            return None, _MISS
        key = f"{rel}\t{st.st_size}\t{st.st_mtime_ns}"
        with self.lock:
            e = self.entries.get(rel)
        if e is not None and e[0] == key:
            with self.lock:
                self.cached += 1
            return key, e[1]
        return key, _MISS

    def store(self, path: Path, key: str, reason: str | None) -> None:
        rel = key.split("\t", 1)[0]
        with self.lock:
            self.entries[rel] = [key, reason]
            self.decoded += 1

    def summary(self, seconds: float) -> str:
        """The check's console line: its time, and how many images were decoded or found unchanged."""
        n = self.decoded + self.cached
        if not n:
            return f"data check: {seconds:.1f} s"
        return (f"data check: {seconds:.1f} s; {self.decoded} image(s) decoded, {self.cached} of {n} unchanged since "
                f"an earlier check (size and mtime) and not decoded again (cache: {self.file})")

    def save(self) -> None:
        from ..results import atomic_write_json

        if self.decoded:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with self.lock:
                atomic_write_json(self.file, {"root": str(self.root), "files": dict(self.entries)})


_MISS = object()
_ACTIVE: list[ImageCheckCache] = []


class image_check_cache:
    """``with image_check_cache(root) as cache:`` -- :func:`check_image` calls inside (any thread) use
    and fill the root's cache, saved at the end."""

    def __init__(self, root: Path) -> None:
        self.cache = ImageCheckCache(root)

    def __enter__(self) -> ImageCheckCache:
        _ACTIVE.append(self.cache)
        return self.cache

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.remove(self.cache)
        self.cache.save()


def check_image(path: Path) -> str | None:
    """None if the image decodes, else the reason (JPEGs in draft mode, which still reads the whole
    entropy-coded stream). Inside :class:`image_check_cache` an unchanged file's earlier result is
    returned without decoding it again."""
    cache = _ACTIVE[-1] if _ACTIVE else None
    if cache is not None:
        key, hit = cache.lookup(path)
        if hit is not _MISS:
            return hit
        reason = _decode(path)
        if key is not None:
            cache.store(path, key, reason)
        return reason
    return _decode(path)


def _decode(path: Path) -> str | None:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return "file not found"
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"does not decode ({type(e).__name__}: {e})"
    return None


def files_by_stem(folder: Path, suffix: str) -> dict[str, Path]:
    """stem -> file of the files with ``suffix`` in ``folder`` (hidden files, such as macOS's ``._*``
    companions, left out)."""
    return {p.stem: p for p in folder.iterdir() if p.suffix == suffix and not p.name.startswith(".") and p.is_file()}


def pair_files(images: dict[str, Path], labels: dict[str, Path], img_dir: Path, label_dir: Path,
               img_suffix: str, label_suffix: str, what: str = "annotation") -> tuple[list[str], list[Problem]]:
    """The stems that have both an image and a label (sorted), and a problem for each file
    without its partner."""
    bad = [(str(images[s]), f"no {what} {label_dir / (s + label_suffix)}") for s in sorted(set(images) - set(labels))]
    bad += [(str(labels[s]), f"no image {img_dir / (s + img_suffix)}") for s in sorted(set(labels) - set(images))]
    return sorted(set(images) & set(labels)), bad


def seeded_subset(stems: Sequence[str], n: int | None, seed: int) -> tuple[list[str], int | None]:
    """A seeded random subset of ``n`` stems (not the first n in name order), sorted, and its size;
    all stems and None when no subset is asked for or n covers them all."""
    if n is None or int(n) >= len(stems):
        return list(stems), None
    pick = np.random.default_rng(int(seed)).choice(len(stems), size=int(n), replace=False)
    out = sorted(stems[i] for i in pick)
    return out, len(out)


def check_samples(stems: Sequence[str], check_one: Callable[[str], tuple[list[Problem], T]], *,
                  skip_bad: bool, where: str, error: type[DatasetError] = DatasetError,
                  bad: Iterable[Problem] = (), on_ok: Callable[[str, T], None] | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  workers: int | None = None) -> tuple[list[str], list[Problem]]:
    """Check every sample: ``check_one(stem)`` returns its problems and a payload (handed to
    ``on_ok(stem, payload)`` in stem order for a sample without problems). ``bad`` holds problems
    found before (unpaired files). Any problem is one ``error`` listing them all, unless
    ``skip_bad``: then the bad samples are dropped and returned. No usable sample is an error too.
    Returns (usable stems in order, problems)."""
    problems = list(bad)
    ok: list[str] = []
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 2)) as pool:
        for i, (stem, (errs, payload)) in enumerate(zip(stems, pool.map(check_one, stems))):
            if errs:
                problems.extend(errs)
            else:
                ok.append(stem)
                if on_ok is not None:
                    on_ok(stem, payload)
            if progress:
                progress(i + 1, len(stems))
    if problems and not skip_bad:
        raise error(f"{len(problems)} problem(s) in {where}:\n{problem_listing(problems)}\n"
                    "Fix or remove those files, or pass --skip-bad-images to drop the samples (they are "
                    "counted in result.json).")
    if not ok:
        raise error(f"{where}: no usable sample ({len(problems)} skipped)")
    return ok, problems


def raising(check: Callable[[str], Any], error: type[DatasetError]) -> Callable[[str], tuple[list[Problem], Any]]:
    """Adapt a check that raises ``error`` for a bad sample (and returns a payload) to
    :func:`check_samples`' form; the problem is (stem, message)."""
    def one(stem: str) -> tuple[list[Problem], Any]:
        try:
            return [], check(stem)
        except error as e:
            return [(stem, str(e))], None
    return one


__all__ = ["DatasetError", "ImageCheckCache", "Problem", "check_image", "image_check_cache", "check_samples", "files_by_stem", "pair_files",
           "problem_listing", "raising", "seeded_subset"]
