"""``fourm-eval data download KIND DEST``: fetch a public dataset from its official release URLs,
verify it against published checksums, unpack it into the layout its task reads, and run the
task's data check (the same code as ``fourm-eval data check``).

What each kind fetches is data (:data:`CATALOGUE`): URL, file name, size and checksum as published,
and where the value was published. Everything lives under ``DEST``::

    DEST/.download/<file>.part           a download in progress (resumed with an HTTP Range request)
    DEST/.download/<file>                a complete, verified file (or one the user placed there)
    DEST/.download/<file>.verified.json  what verification found (size, mtime, sha256) -- not re-hashed
    DEST/.download/<file>.extracted.json written after a complete extraction (a rerun skips it)
    DEST/.download/rejected/<file>       a file whose size or checksum was wrong: never extracted
    DEST/.download/COMPLETE-<kind>.json  downloaded, verified, unpacked and checked: a rerun stops here
    DEST/DOWNLOAD_MANIFEST.json          every file: URL, size, sha256, verified or not (and against what)

Rules:

* A ``.part`` file is resumed with ``Range: bytes=<size>-``; a server that answers 200 (ignores the
  range) restarts the file from byte 0; a connection lost mid-file is resumed up to ``retries`` times
  in the same call, and a later rerun resumes from what is on disk.
* A file with a published size and checksum is verified before use; a mismatch raises
  :class:`~fourm_eval.errors.ChecksumError` naming the file, the expected and found values and the URL,
  and the file is moved to ``DEST/.download/rejected/`` (a rerun downloads it again).
* A file the release publishes no checksum for (NYUv2) cannot be verified: its sha256 and size are
  recorded in the manifest and a loud warning says so.
* Without network access, place the files in ``DEST/.download/`` by other means and rerun: they are
  verified, not downloaded. ``--mirror`` / ``$FOURM_EVAL_DATA_MIRROR`` fetch the same paths from
  another host (the checksums still apply).
* ImageNet-1K and ImageNet-21K are licence-gated: nothing is downloaded; :func:`manual_steps` gives
  the exact steps (exit status :data:`MANUAL_EXIT_CODE` on the command line).

HTTP is done with the standard library's ``urllib.request`` rather than ``httpx2`` (which is installed
only as huggingface_hub's dependency): it needs no new dependency, and the few things this module needs
(a Range header, the raw status 200/206/416, Content-Range, streaming reads) are plain there.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ChecksumError, ConfigError, DownloadError

Log = Callable[[str], None]

MIRROR_ENV = "FOURM_EVAL_DATA_MIRROR"
DOWNLOAD_DIR = ".download"
REJECTED_DIR = "rejected"
MANIFEST = "DOWNLOAD_MANIFEST.json"
MANUAL_EXIT_CODE = 3   # `fourm-eval data download imagenet|imagenet21k`: steps printed, nothing downloaded
CHUNK = 1 << 20
USER_AGENT = "fourm-eval-data-download (+urllib)"


@dataclass(frozen=True)
class Source:
    """One file of a release. ``size`` (bytes) and ``algorithm``/``checksum`` are the published values,
    None where the release publishes none; ``citation`` says where they were published."""
    url: str
    filename: str
    size: int | None
    algorithm: str | None          # "sha256", "sha1", "md5" (hashlib names)
    checksum: str | None
    citation: str
    unpack: str | None = "zip"     # "zip": extracted into DEST; None: used as is (NYU's .mat files)

    @property
    def identity(self) -> str:
        """What an extraction marker records: the published checksum, or the file name when there is none."""
        return f"{self.algorithm}:{self.checksum}" if self.checksum else f"unverified:{self.filename}"


@dataclass(frozen=True)
class Recipe:
    """What ``fourm-eval data download KIND`` does for one data kind."""
    kind: str                      # the data kind of `fourm-eval data check`
    title: str
    sources: tuple[Source, ...]
    root: str                      # the data root, relative to DEST ("." = DEST itself)
    convert: bool = False          # run the task's converter (NYUv2) from the sources into the root
    manual: bool = False           # licence-gated: steps only


_TFDS = "tensorflow/datasets tensorflow_datasets/url_checksums/{} @ {} (size, sha256)"
_COCO_SRC = (_TFDS.format("coco2017.txt", "2282548bab4888cabcdca563e3ed01370e7a9bdc")
             + "; the same files' sha1 in dmlc/gluon-cv scripts/datasets/mscoco.py")
_ADE_SRC = (_TFDS.format("ade20k.txt", "6f96ef336b50caf3a27f90f1800f400a3ee5fb4b")
            + "; sha1 219e1696abb36c8ba3a3afe7fb2f4b4606a897c7 in dmlc/gluon-cv scripts/datasets/ade20k.py")
_NYU_SRC = ("none published: the NYU Depth V2 page (cs.nyu.edu/~silberman/datasets/nyu_depth_v2.html) gives "
            "no checksum or exact size; sha256 and size of what was fetched are recorded in the manifest")

CATALOGUE: dict[str, Recipe] = {
    "coco": Recipe("coco", "COCO 2017 detection (train2017, val2017, instances annotations)", (
        # sizes and sha256: tensorflow_datasets/url_checksums/coco2017.txt (see _COCO_SRC)
        Source("http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
               "annotations_trainval2017.zip", 252_907_541, "sha256",
               "113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268", _COCO_SRC),
        Source("http://images.cocodataset.org/zips/val2017.zip", "val2017.zip", 815_585_330, "sha256",
               "4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05", _COCO_SRC),
        Source("http://images.cocodataset.org/zips/train2017.zip", "train2017.zip", 19_336_861_798, "sha256",
               "69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929", _COCO_SRC),
    ), root="."),
    "ade20k": Recipe("ade20k", "ADE20K SceneParsing (ADEChallengeData2016)", (
        # size and sha256: tensorflow_datasets/url_checksums/ade20k.txt (see _ADE_SRC)
        Source("http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
               "ADEChallengeData2016.zip", 967_382_037, "sha256",
               "7ff1be44964418441f542a7cc1e1a650e7dc0fc275f5d23252bc9bbdbc977b29", _ADE_SRC),
    ), root="ADEChallengeData2016"),
    "nyu": Recipe("nyu", "NYUv2 labelled set + official splits, converted for nyu-depth", (
        Source("http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat",
               "nyu_depth_v2_labeled.mat", None, None, None, _NYU_SRC, unpack=None),
        Source("http://horatio.cs.nyu.edu/mit/silberman/indoor_seg_sup/splits.mat",
               "splits.mat", None, None, None, _NYU_SRC, unpack=None),
    ), root="nyu", convert=True),
    "imagenet": Recipe("imagenet", "ImageNet-1K (ILSVRC2012): licence-gated, manual steps", (), root=".",
                       manual=True),
    "imagenet21k": Recipe("imagenet21k", "ImageNet-21K winter21: licence-gated, manual steps", (),
                          root="winter21_whole", manual=True),
}

# ImageNet-1K archives as published, for the manual steps (never downloaded here):
# sizes and sha256: tensorflow/datasets tensorflow_datasets/url_checksums/imagenet2012.txt
#   @ 333639b37af6c6fedf3610a4a2d42f1c6ef6f7d5;
# md5: pytorch/vision torchvision/datasets/imagenet.py (ARCHIVE_META) @ 0d7913da146566a8fd92c307ddf21ab12aa4b7bd
IMAGENET_ARCHIVES = (
    ("ILSVRC2012_img_train.tar", 147_897_477_120,
     "b08200a27a8e34218a0e58fde36b0fe8f73bc377f4acea2d91602057c3ca45bb", "1d675b47d978889d74fa0da5fadfb00e"),
    ("ILSVRC2012_img_val.tar", 6_744_924_160,
     "c7e06a6c0baccf06d8dbeb6577d71efff84673a5dbdd50633ab44f8ea0456ae0", "29b22e2961454d5413ddabcf34fc5622"),
    ("ILSVRC2012_devkit_t12.tar.gz", None, None, "fa75699e90414af021442c21a62c3abf"),
)


@dataclass
class DownloadResult:
    kind: str
    data_root: Path
    already_complete: bool                     # a rerun that found everything done
    files: list[dict[str, Any]] = field(default_factory=list)  # the manifest's entries
    unverified: list[str] = field(default_factory=list)        # files without a published checksum
    check: str = ""                            # the data check's last line ("" when skipped)


# ------------------------------------------------------------------ catalogue helpers
def recipe_for(kind: str) -> Recipe:
    """The recipe of a data kind or a task name (``coco-det`` -> ``coco``); a named error otherwise."""
    if kind in CATALOGUE:
        return CATALOGUE[kind]
    try:
        from fourm_eval.tasks import get_task
        data_kind = get_task(kind).data_kind
    except Exception:  # noqa: BLE001 -- any lookup failure is the same user error
        data_kind = None
    if data_kind in CATALOGUE:
        return CATALOGUE[data_kind]
    raise ConfigError(f"no download for {kind!r}; known: {', '.join(CATALOGUE)} (or their task names)")


def mirror_url(url: str, mirror: str | None) -> str:
    """``url`` with its scheme and host replaced by the mirror's (a path in the mirror is a prefix):
    ``mirror_url("http://images.cocodataset.org/zips/val2017.zip", "https://m.example/coco")`` is
    ``https://m.example/coco/zips/val2017.zip``. No mirror: ``url`` unchanged."""
    if not mirror:
        return url
    m, u = urllib.parse.urlsplit(mirror), urllib.parse.urlsplit(url)
    if not m.scheme or not m.netloc:
        raise ConfigError(f"mirror {mirror!r}: expected a URL such as https://host[:port][/prefix]")
    return urllib.parse.urlunsplit((m.scheme, m.netloc, m.path.rstrip("/") + u.path, u.query, ""))


def _fmt_size(n: int | None) -> str:
    if n is None:
        return "size not published"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return ""


# ------------------------------------------------------------------ fetching
class _Broken(Exception):
    """A transfer that stopped early or failed transiently: resumed (retried) by :func:`fetch`."""


def _progress_bar(total: int | None, initial: int, desc: str, show: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not show, dynamic_ncols=True, mininterval=0.5, leave=True)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range: bytes a-b/total`` (or ``bytes */total``) header."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    first = int(span.split("-")[0]) if span and span != "*" else None
    return first, (int(total) if total.strip().isdigit() else None)


def _unreachable(url: str, target: Path, why: object) -> DownloadError:
    return DownloadError(
        f"{url}: cannot reach the host ({why}). Without network access from here, download the file by other "
        f"means (a browser, another machine) and place it as {target}, then rerun the same command: the file is "
        f"then only verified. Or fetch the same paths from a mirror with --mirror URL (${MIRROR_ENV}).")


def _fetch_once(url: str, part: Path, size: int | None, timeout: float, log: Log, show: bool,
                seen_ranges: list[str] | None = None) -> None:
    """One HTTP request: continue ``part`` from its size (Range), or start it over when the server
    ignores the range. Raises :class:`_Broken` for a transfer worth resuming."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:     # larger than the published file: start over
        part.unlink()
        offset = 0
    if size is not None and offset == size and offset > 0:
        return                                  # complete already (interrupted before verification)
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:            # the range starts at or past the end
            _, total = _content_range(e.headers.get("Content-Range"))
            if total is not None and total == offset:
                return
            part.unlink()
            raise _Broken(f"the server refused to resume at byte {offset} (HTTP 416); starting over") from None
        if e.code >= 500 or e.code == 429:
            raise _Broken(f"HTTP {e.code} {e.reason}") from None
        hint = (" (the release may have moved: check the dataset's page, use --mirror URL, or place the file "
                f"as {part.with_suffix('')} and rerun)" if e.code in (403, 404, 410) else "")
        raise DownloadError(f"{url}: HTTP error {e.code} {e.reason}{hint}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, socket.gaierror):   # no such host: retrying does not help
            raise _unreachable(url, part.with_suffix(""), e.reason) from None
        raise _Broken(f"cannot connect ({e.reason})") from None
    except (OSError, http.client.HTTPException) as e:
        raise _Broken(f"cannot connect ({type(e).__name__}: {e})") from None
    with resp:
        status = resp.status
        if status == 206 and offset:
            first, total = _content_range(resp.headers.get("Content-Range"))
            if first != offset:
                part.unlink()
                raise _Broken(f"the server resumed at byte {first}, not {offset}; starting over")
            mode = "ab"
        elif status == 200:
            if offset:
                log(f"{part.name}: the server ignored the Range request (HTTP 200); restarting from byte 0")
            offset, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise DownloadError(f"{url}: unexpected HTTP status {status} (expected 200, or 206 to a Range request)")
        if size is not None and total is not None and total != size:
            raise DownloadError(f"{url}: the server announces {total:,} bytes; {part.with_suffix('').name} is "
                                f"published as {size:,} bytes (a different file, or a wrong mirror)")
        if seen_ranges is not None:
            seen_ranges.append(headers.get("Range", ""))
        with open(part, mode) as f, _progress_bar(total, offset, part.with_suffix("").name, show) as bar:
            try:
                _pump(resp.read, f.write, bar)
            except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                f.flush()
                raise _Broken(f"connection lost at byte {f.tell():,} ({type(e).__name__})") from None
            got = f.tell()
    if total is not None and got < total:
        raise _Broken(f"connection closed at byte {got:,} of {total:,}")
    if size is not None and got < size:
        raise _Broken(f"connection closed at byte {got:,} of {size:,}")


def fetch(url: str, part: Path, size: int | None, *, retries: int = 5, backoff: float = 2.0,
          timeout: float = 60.0, log: Log = print, progress: bool = False,
          seen_ranges: list[str] | None = None) -> Path:
    """Download ``url`` into ``part`` (a ``.part`` file), resuming what is there; returns ``part``.
    A lost connection is resumed up to ``retries`` times, waiting ``backoff * 2**attempt`` seconds;
    after that the partial file stays for a rerun to resume. ``seen_ranges`` collects the Range
    header of each answered request ("" for none) -- for tests and diagnostics."""
    part.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, size, timeout, log, progress, seen_ranges)
            return part
        except _Broken as e:
            have = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                if have == 0:
                    raise _unreachable(url, part.with_suffix(""), e) from None
                raise DownloadError(f"{url}: {e}; gave up after {retries + 1} attempt(s). {have:,} bytes are kept "
                                    f"in {part}: rerun the same command to resume.") from None
            log(f"{part.with_suffix('').name}: {e}; resuming from byte {have:,} "
                f"(attempt {attempt + 2}/{retries + 1})")
            time.sleep(backoff * 2 ** attempt)
    return part


# ------------------------------------------------------------------ verification
def file_digest(path: Path, algorithm: str = "sha256", show: bool = False) -> str:
    """Hex digest of a file, read in 1 MiB blocks (with a progress bar when ``show``)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f, _progress_bar(path.stat().st_size, 0, f"verify {path.name}", show) as bar:
        _pump(f.read, h.update, bar)
    return h.hexdigest()


def _pump(read: Callable[[int], bytes], write: Callable[[bytes], Any], bar: Any) -> None:
    """Blocks of CHUNK bytes from ``read`` to ``write`` until the source ends, counted on ``bar``."""
    while True:
        block = read(CHUNK)
        if not block:
            return
        write(block)
        bar.update(len(block))


def _reject(path: Path, download_dir: Path, name: str) -> Path:
    rejected = download_dir / REJECTED_DIR / name
    rejected.parent.mkdir(parents=True, exist_ok=True)
    if rejected.exists():
        rejected.unlink()
    path.replace(rejected)
    return rejected


def verify(path: Path, src: Source, url: str, download_dir: Path, show: bool = False) -> dict[str, Any]:
    """Check ``path`` against the published size and checksum; returns its manifest entry. A mismatch
    moves the file to ``rejected/`` and raises :class:`ChecksumError`. Files without a published
    checksum get their sha256 recorded (``verified: False``)."""
    size = path.stat().st_size
    entry: dict[str, Any] = {"file": src.filename, "url": url, "size": size, "published_size": src.size,
                             "algorithm": src.algorithm, "published_checksum": src.checksum,
                             "source_of_values": src.citation}
    if src.size is not None and size != src.size:
        rejected = _reject(path, download_dir, src.filename)
        raise ChecksumError(f"{src.filename}: {size:,} bytes, expected {src.size:,} (published: {src.citation}); "
                            f"from {url}; moved aside to {rejected} and not used -- rerun to download it again")
    got_sha256 = file_digest(path, "sha256", show)
    got = got_sha256 if src.algorithm in (None, "sha256") else file_digest(path, src.algorithm, show)
    if src.checksum is not None and got.lower() != src.checksum.lower():
        rejected = _reject(path, download_dir, src.filename)
        raise ChecksumError(f"{src.filename}: {src.algorithm} {got}, expected {src.checksum} (published: "
                            f"{src.citation}); from {url}; moved aside to {rejected} and not used -- rerun to "
                            "download it again")
    st = path.stat()
    entry.update(sha256=got_sha256, verified=src.checksum is not None, mtime_ns=st.st_mtime_ns)
    return entry


def _marker(download_dir: Path, name: str, what: str) -> Path:
    return download_dir / f"{name}.{what}.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def ensure_file(src: Source, url: str, download_dir: Path, *, log: Log, progress: bool = False,
                **fetch_kw: Any) -> dict[str, Any]:
    """The verified file ``download_dir/<filename>``: kept when verified before and unchanged, verified
    when placed by hand, downloaded (resuming a ``.part``) otherwise. Returns its manifest entry."""
    from ..results import atomic_write_json

    target = download_dir / src.filename
    vmark = _marker(download_dir, src.filename, "verified")
    if target.is_file():
        rec = _read_json(vmark)
        st = target.stat()
        if (rec and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns
                and rec.get("published_checksum") == src.checksum):
            return rec
        log(f"{target}: present; verifying it (not downloading)")
        entry = verify(target, src, url, download_dir, progress)
    else:
        part = target.with_name(target.name + ".part")
        if part.exists():
            log(f"{src.filename}: resuming {part} ({part.stat().st_size:,} bytes) from {url}")
        else:
            log(f"{src.filename}: downloading {url} ({_fmt_size(src.size)})")
        fetch(url, part, src.size, log=log, progress=progress, **fetch_kw)
        entry = verify(part, src, url, download_dir, progress)
        part.replace(target)
        entry["mtime_ns"] = target.stat().st_mtime_ns
    atomic_write_json(vmark, entry)
    return entry


# ------------------------------------------------------------------ extraction
def _safe_member(name: str, dest: Path) -> Path:
    """Where a zip member may be written: inside ``dest``, no absolute path, drive or ``..``."""
    norm = name.replace("\\", "/")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if norm.startswith("/") or (parts and ":" in parts[0]) or ".." in parts or not parts:
        raise DownloadError(f"unsafe archive entry {name!r} (absolute, or outside the destination); nothing "
                            "of it was written")
    target = dest.joinpath(*parts)
    if not str(target.resolve()).startswith(str(dest.resolve()) + os.sep):
        raise DownloadError(f"unsafe archive entry {name!r} (resolves outside {dest})")
    return target


def extract_zip(archive: Path, dest: Path, show: bool = False) -> dict[str, int]:
    """Extract ``archive`` into ``dest``; every entry checked first (:func:`_safe_member`, no symbolic
    links), CRCs checked while reading. Returns counts (files, bytes)."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            plan = []
            for info in infos:
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise DownloadError(f"{archive}: entry {info.filename!r} is a symbolic link; refused")
                try:
                    plan.append((info, _safe_member(info.filename, dest)))
                except DownloadError as e:
                    raise DownloadError(f"{archive}: {e}") from None
            total = sum(i.file_size for i in infos)
            n = 0
            with _progress_bar(total, 0, f"extract {archive.name}", show) as bar:
                for info, target in plan:
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_name(target.name + ".partial")
                    with zf.open(info) as src, open(tmp, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
                    tmp.replace(target)
                    n += 1
                    bar.update(info.file_size)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise DownloadError(f"{archive}: not a readable zip archive ({e}); delete it and rerun to download it "
                            "again") from None
    return {"files": n, "bytes": total}


# ------------------------------------------------------------------ the data check
def check_dataset(kind: str, root: Path, log: Log) -> str:
    """The task's own data check (what ``fourm-eval data check KIND ROOT`` runs, with the paper
    profile); returns its summary line (``<task>: N training / M validation images``). Named errors (:class:`DatasetError`) propagate."""
    from fourm_eval.tasks import get_task
    from fourm_eval.tasks.profiles import load_profile

    from .checks import image_check_cache

    t = get_task(kind)
    root = Path(root).expanduser().resolve()
    t0 = time.time()
    with image_check_cache(root) as cache:
        data = t.check_data(root, load_profile(t.name, "paper"), skip_bad_images=False, out_dir=None, log=log)
    log(cache.summary(time.time() - t0))
    return f"{t.name}: {data.n_train} training / {data.n_val} validation images"


# ------------------------------------------------------------------ the command
def _complete_marker(download_dir: Path, kind: str) -> Path:
    return download_dir / f"COMPLETE-{kind}.json"


def download(kind: str, dest: str | Path, *, sources: Sequence[Source] | None = None, mirror: str | None = None,
             check: bool = True, recheck: bool = False, delete_archives: bool = False, log: Log = print,
             warn: Log | None = None, progress: bool = False, retries: int = 5, backoff: float = 2.0,
             timeout: float = 60.0, seen_ranges: list[str] | None = None) -> DownloadResult:
    """Download, verify, unpack (or convert) and check one data kind under ``dest``; idempotent.

    ``sources`` replaces the catalogue's files (same fields: URL, name, size, checksum) -- a private
    mirror with its own listing, or tests. ``mirror`` (default ``$FOURM_EVAL_DATA_MIRROR``) replaces
    each URL's scheme and host (:func:`mirror_url`). ``check=False`` skips the data check;
    ``recheck`` runs it again on a completed download. ``delete_archives`` removes each zip once it is
    extracted. ``warn`` (default ``log``) gets the loud warnings (files without a published checksum).
    Licence-gated kinds raise :class:`ConfigError`: see :func:`manual_steps`."""
    from ..results import atomic_write_json

    recipe = recipe_for(kind)
    warn = warn or log
    if recipe.manual:
        raise ConfigError(f"{recipe.kind}: licence-gated; nothing is downloaded. {manual_steps(recipe.kind, dest)}")
    srcs = tuple(sources) if sources is not None else recipe.sources
    mirror = mirror if mirror is not None else (os.environ.get(MIRROR_ENV) or None)
    dest = Path(dest).expanduser().resolve()
    ddir = dest / DOWNLOAD_DIR
    root = (dest / recipe.root).resolve() if recipe.root != "." else dest
    identities = [s.identity for s in srcs]

    done = _read_json(_complete_marker(ddir, recipe.kind))
    if done and done.get("identities") == identities and root.is_dir():
        unverified = list(done.get("unverified", []))
        log(f"{recipe.kind}: already downloaded, verified, unpacked and checked in {dest} "
            f"({done.get('completed', '?')}); nothing to do")
        if unverified:
            warn(f"WARNING: {', '.join(unverified)}: no published checksum; not verified (sha256 recorded in "
                 f"{dest / MANIFEST})")
        line = check_dataset(recipe.kind, root, log) if recheck else done.get("check", "")
        return DownloadResult(recipe.kind, root, True, list(done.get("files", [])), unverified, line)

    dest.mkdir(parents=True, exist_ok=True)
    fetch_kw = dict(retries=retries, backoff=backoff, timeout=timeout, seen_ranges=seen_ranges)
    entries: list[dict[str, Any]] = []
    converted = recipe.convert and _nyu_converted(root)
    for src in srcs:
        url = mirror_url(src.url, mirror)
        emark = _marker(ddir, src.filename, "extracted")
        erec = _read_json(emark) if src.unpack else None
        if (erec and erec.get("identity") == src.identity) or converted:
            prev = _read_json(_marker(ddir, src.filename, "verified")) or {"file": src.filename, "url": url}
            entries.append(prev)
            log(f"{src.filename}: already " + ("extracted" if src.unpack else "converted") + "; skipped")
            continue
        entry = ensure_file(src, url, ddir, log=log, progress=progress, **fetch_kw)
        entries.append(entry)
        if entry.get("verified"):
            log(f"{src.filename}: {src.algorithm} matches the published value ({entry['size']:,} bytes)")
        else:
            warn(f"WARNING: {src.filename}: the release publishes no checksum, so this file could NOT be "
                 f"verified; recorded sha256 {entry['sha256']}, {entry['size']:,} bytes in {dest / MANIFEST}")
        if src.unpack == "zip":
            archive = ddir / src.filename
            log(f"{src.filename}: extracting into {dest}")
            counts = extract_zip(archive, dest, progress)
            atomic_write_json(emark, {"identity": src.identity, **counts, "into": str(dest),
                                      "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            log(f"{src.filename}: {counts['files']:,} files extracted")
            if delete_archives:
                archive.unlink()
                log(f"{src.filename}: archive deleted (--delete-archives)")
    if recipe.convert and not converted:
        from fourm_eval.tasks import get_task
        get_task(recipe.kind).convert([ddir / s.filename for s in srcs], root, log)
    unverified = [e["file"] for e in entries if not e.get("verified")]
    atomic_write_json(dest / MANIFEST, {"kind": recipe.kind, "data_root": str(root), "files": entries,
                                        "unverified": unverified})
    line = check_dataset(recipe.kind, root, log) if check else ""
    if check:
        atomic_write_json(_complete_marker(ddir, recipe.kind),
                          {"kind": recipe.kind, "data_root": str(root), "identities": identities,
                           "files": entries, "unverified": unverified, "check": line,
                           "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    if unverified:
        warn(f"WARNING: {', '.join(unverified)}: no published checksum; NOT verified (sha256 and size recorded "
             f"in {dest / MANIFEST})")
    return DownloadResult(recipe.kind, root, False, entries, unverified, line)


def _nyu_converted(root: Path) -> bool:
    from .nyu_convert import MARKER
    return (root / MARKER).is_file()


# ------------------------------------------------------------------ licence-gated: the steps
def manual_steps(kind: str, dest: str | Path) -> str:
    """The exact steps to obtain a licence-gated dataset (``imagenet``, ``imagenet21k``) in the layout
    its task reads, ending with the ``fourm-eval data check`` command."""
    recipe = recipe_for(kind)
    d = Path(dest).expanduser()
    if recipe.kind == "imagenet":
        sums = "\n".join(f"     {sha}  {name}" for name, _, sha, _ in IMAGENET_ARCHIVES if sha)
        md5s = "\n".join(f"     {md5}  {name}" for name, _, _, md5 in IMAGENET_ARCHIVES)
        return f"""ImageNet-1K (ILSVRC2012) is licence-gated; fourm-eval does not download it.
  1. Register at https://image-net.org/ (Login/Signup), accept the terms of access, and from
     "Download" -> ILSVRC 2012 download these files into {d / DOWNLOAD_DIR}:
       ILSVRC2012_img_train.tar      (138 GiB: {IMAGENET_ARCHIVES[0][1]:,} bytes)
       ILSVRC2012_img_val.tar        (6.3 GiB: {IMAGENET_ARCHIVES[1][1]:,} bytes)
       ILSVRC2012_devkit_t12.tar.gz  (development kit, task 1 & 2: the validation labels)
  2. Verify them (sha256 from tensorflow_datasets url_checksums/imagenet2012.txt; md5 from torchvision):
     cd {d / DOWNLOAD_DIR}
     sha256sum -c <<'EOF'
{sums}
     EOF
     md5sum -c <<'EOF'
{md5s}
     EOF
  3. Unpack train into one folder per WordNet id (1,000 inner archives):
     mkdir -p {d}/train && tar -xf ILSVRC2012_img_train.tar -C {d}/train
     cd {d}/train && for f in n*.tar; do mkdir -p "${{f%.tar}}" && tar -xf "$f" -C "${{f%.tar}}" && rm "$f"; done
  4. Unpack val (50,000 flat images) and move each into its class folder with the devkit's labels:
     mkdir -p {d}/val && tar -xf {d / DOWNLOAD_DIR}/ILSVRC2012_img_val.tar -C {d}/val
     python -c "from fourm_eval.data.download import imagenet_val_to_folders as f; f('{d}/val', '{d / DOWNLOAD_DIR}/ILSVRC2012_devkit_t12.tar.gz')"
  5. Check the layout (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) and every image:
     fourm-eval data check imagenet {d}
     then train with --data-root {d}"""
    from .imagenet21k_check import UNPACK_HINT
    return f"""ImageNet-21K (winter 2021 release) is licence-gated; fourm-eval does not download it.
  1. Register at https://image-net.org/ (Login/Signup), accept the terms of access, and from
     "Download" -> "Winter 2021 release" download winter21_whole.tar.gz (about 1.1 TiB; no checksum
     is published) into {d / DOWNLOAD_DIR}.
  2. Unpack it; it holds winter21_whole/ with one <wnid>.tar per class (19,167):
     tar -xzf {d / DOWNLOAD_DIR}/winter21_whole.tar.gz -C {d}
  3. In {d}/winter21_whole, {UNPACK_HINT}
     cd {d}/winter21_whole && for f in n*.tar; do mkdir -p "${{f%.tar}}" && tar -xf "$f" -C "${{f%.tar}}" && rm "$f"; done
  4. Check the layout (<wnid>/*.JPEG, no split: the held-out split is derived from file names):
     fourm-eval data check imagenet21k {d}/winter21_whole
     then train with --data-root {d}/winter21_whole (or --stage-data-root for the chained protocol)"""


def imagenet_val_to_folders(val_dir: str | Path, devkit: str | Path) -> int:
    """Move ILSVRC2012's flat validation images (``ILSVRC2012_val_00000001.JPEG``, ...) into
    ``<wnid>/`` folders, by the devkit's ``data/ILSVRC2012_validation_ground_truth.txt`` (ILSVRC2012
    ids, one line per image in file-number order) and ``data/meta.mat`` (id -> wnid for the 1,000
    leaf synsets). Returns the number of images moved; rerunning moves nothing."""
    import io
    import tarfile

    import numpy as np
    import scipy.io

    from .checks import DatasetError

    val_dir, devkit = Path(val_dir), Path(devkit)
    try:
        with tarfile.open(devkit) as tf:
            names = {m.name.split("/data/", 1)[-1]: m for m in tf.getmembers() if "/data/" in m.name}
            meta = tf.extractfile(names["meta.mat"]).read()
            truth = tf.extractfile(names["ILSVRC2012_validation_ground_truth.txt"]).read().split()
    except (OSError, tarfile.TarError, KeyError, AttributeError) as e:
        raise DatasetError(f"{devkit}: not the ILSVRC2012 devkit (expected ILSVRC2012_devkit_t12/data/meta.mat and "
                           f"data/ILSVRC2012_validation_ground_truth.txt; {type(e).__name__}: {e})") from None
    synsets = np.atleast_1d(scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"])
    wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    labels = [int(v) for v in truth]
    moved = 0
    for f in sorted(val_dir.glob("ILSVRC2012_val_*.JPEG")):
        k = int(f.stem.rsplit("_", 1)[-1])
        if not 1 <= k <= len(labels) or labels[k - 1] not in wnid_of:
            raise DatasetError(f"{f}: no label for image number {k} in {devkit}")
        folder = val_dir / wnid_of[labels[k - 1]]
        folder.mkdir(exist_ok=True)
        f.replace(folder / f.name)
        moved += 1
    return moved


__all__ = ["CATALOGUE", "DownloadResult", "MANIFEST", "MANUAL_EXIT_CODE", "MIRROR_ENV", "Recipe", "Source",
           "check_dataset", "download", "ensure_file", "extract_zip", "fetch", "file_digest", "imagenet_val_to_folders",
           "manual_steps", "mirror_url", "recipe_for", "verify"]
