"""Weights from the Hugging Face hub: fetched when missing, pinned to a commit, recorded.

A hub checkpoint is written ``OWNER/NAME`` (the default branch) or ``OWNER/NAME@REVISION`` (a branch,
a tag or a 40-digit commit). It is resolved with huggingface_hub, into the same cache timm and the
``hf`` command line use (``HF_HOME`` / ``HF_HUB_CACHE``):

* in the cache: used as it is (an online call still asks the hub which commit the revision names);
* not in the cache: downloaded, with huggingface_hub's progress bar;
* offline (``HF_HUB_OFFLINE=1``, or ``--offline`` on ``run`` / ``sweep`` / ``fetch``, which sets it):
  the cache only; a missing file is an error naming the repository, the file and the revision.

What was resolved is a :class:`HubFile`: the commit the revision named and the file's sha256. The
sha256 is checked against the hub's own: an LFS file is stored in the cache under its sha256 (the
hub's ETag), so a cached blob whose content does not hash to its name is a corrupt cache, an error.

A sweep pins what it fetched in a lock file (:class:`WeightsLock`, ``OUT/weights.lock.json``): the
commit and sha256 each revision resolved to the first time. When the revision later names another
commit (a new upload under ``main``), the sweep stops with an error naming both commits instead of
running a different model under the same name; the cells run the locked commit.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import CheckpointError

HUB_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_FILE = "model.safetensors"
LOCK_FILE = "weights.lock.json"
_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None     # None: the repository's default branch
    filename: str = DEFAULT_FILE

    @property
    def spec(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    @property
    def key(self) -> str:
        return f"{self.repo_id}@{self.revision or 'main'}:{self.filename}"


@dataclass
class HubFile:
    repo_id: str
    filename: str
    revision: str            # as asked ("main" when none was)
    commit: str              # the commit it resolved to
    sha256: str
    size: int
    path: str                # in the local cache
    downloaded: bool         # fetched by this call (else: found in the cache)

    def record(self) -> dict[str, Any]:
        """What a result record keeps (the cache path is the record's ``checkpoint``)."""
        d = asdict(self)
        d.pop("path")
        return d


def parse_hub_spec(spec: str | os.PathLike, filename: str = DEFAULT_FILE) -> HubRef | None:
    """``OWNER/NAME[@REVISION]`` -> HubRef; anything else (a path, a file name) -> None.

    A string that names an existing file or folder is a path, never a hub id."""
    s = str(spec)
    if Path(os.path.expanduser(s)).exists():
        return None
    repo, _, rev = s.partition("@")
    if not HUB_REPO_RE.match(repo) or repo.endswith(_CHECKPOINT_SUFFIXES):
        return None
    if "@" in s and not rev:
        raise CheckpointError(f"{s}: nothing after '@'; write OWNER/NAME@REVISION (a branch, tag or commit)")
    return HubRef(repo, rev or None, filename)


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``--offline``, which sets it) as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def set_offline() -> None:
    """The ``--offline`` switch: this process and every child it starts (sweep cells) stay offline."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:  # huggingface_hub reads the variable once, at import
        from huggingface_hub import constants
        constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - a dependency
        pass


def cache_location() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE
    return str(HF_HUB_CACHE)


def _explain(ref: HubRef, err: BaseException, offline: bool) -> CheckpointError:
    from huggingface_hub import errors as he

    where = f"{ref.repo_id}/{ref.filename} (revision {ref.revision or 'main'})"
    cache = cache_location()
    if offline and isinstance(err, (he.LocalEntryNotFoundError, he.OfflineModeIsEnabled)):
        return CheckpointError(
            f"{where} is not in the local Hugging Face cache ({cache}) and the hub is offline (HF_HUB_OFFLINE=1 "
            f"or --offline). On a machine with network run `fourm-eval fetch SWEEP` (or `hf download "
            f"{ref.repo_id} {ref.filename}{' --revision ' + ref.revision if ref.revision else ''}`) and copy the "
            f"cache here, or pass the path of the file")
    if isinstance(err, he.GatedRepoError):
        return CheckpointError(f"{where}: the repository is gated; accept its terms on the hub and log in "
                               f"(`hf auth login` or HF_TOKEN)")
    if isinstance(err, he.RepositoryNotFoundError):
        return CheckpointError(f"{where}: no such repository on the hub (or it is private: log in with "
                               f"`hf auth login` or HF_TOKEN)")
    if isinstance(err, he.RevisionNotFoundError):
        return CheckpointError(f"{where}: the repository has no revision {ref.revision!r} (a branch, tag or "
                               f"commit)")
    if isinstance(err, he.RemoteEntryNotFoundError):
        return CheckpointError(f"{where}: the repository has no file {ref.filename!r} at that revision")
    if isinstance(err, he.LocalEntryNotFoundError):
        from huggingface_hub.constants import ENDPOINT

        cause = err.__cause__ or err.__context__
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if status is not None:
            return CheckpointError(f"{where}: the hub ({ENDPOINT}) answered HTTP {status} "
                                   f"({str(cause).splitlines()[0][:200]}), and the file is not in the local cache "
                                   f"({cache})")
        return CheckpointError(
            f"{where}: the hub ({ENDPOINT}) could not be reached ({type(cause).__name__ if cause else 'no connection'}: "
            f"{str(cause or err).splitlines()[0][:200]}) and the file is not in the local cache ({cache}). Check "
            f"the connection (or HF_ENDPOINT), or fetch it where there is network and copy the cache")
    return CheckpointError(f"{where}: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}")


def _commit_of(path: str) -> str | None:
    parts = Path(path).parts
    if "snapshots" in parts:
        c = parts[parts.index("snapshots") + 1]
        return c if COMMIT_RE.match(c) else None
    return None


def probe(ref: HubRef, offline: bool | None = None) -> tuple[bool, str | None, int | None]:
    """(cached, commit, size) of a hub file without downloading it (offline: the cache's answer)."""
    from huggingface_hub import hf_hub_download

    offline = is_offline() if offline is None else offline
    try:
        info = hf_hub_download(ref.repo_id, ref.filename, revision=ref.revision, local_files_only=offline,
                               dry_run=True)
    except Exception as e:  # noqa: BLE001 - every hub error becomes a named CheckpointError
        raise _explain(ref, e, offline) from None
    return bool(info.is_cached), info.commit_hash, info.file_size


def fetch(ref: HubRef, offline: bool | None = None, say: Callable[[str], None] | None = None,
          lock: "WeightsLock | None" = None) -> HubFile:
    """The file of ``ref`` in the local cache, downloaded first when it is not there (never offline).

    Raises CheckpointError naming the repository, file and revision for every failure, and for a
    cached file whose content does not match the hub's sha256. With ``lock``: a revision that names
    another commit than the lock pinned is an error before anything is downloaded, and the file must
    have the pinned sha256."""
    from huggingface_hub import hf_hub_download

    from .checkpoints import cached_sha256

    offline = is_offline() if offline is None else offline
    cached, commit, size = probe(ref, offline)
    if lock is not None and commit:
        lock.check_commit(ref, commit)
    if not cached and say is not None:
        say(f"downloading {ref.repo_id}/{ref.filename} (revision {ref.revision or 'main'}, commit "
            f"{(commit or '?')[:12]}, {_size_words(size)}) into {cache_location()}")
    try:
        path = hf_hub_download(ref.repo_id, ref.filename, revision=ref.revision, local_files_only=offline)
    except Exception as e:  # noqa: BLE001
        raise _explain(ref, e, offline) from None
    commit = _commit_of(path) or commit
    if not commit:
        raise CheckpointError(f"{path}: not under a snapshots/<commit>/ folder of the Hugging Face cache; cannot "
                              f"tell which commit of {ref.repo_id} it is")
    sha = cached_sha256(path)
    blob = Path(path).resolve()
    if SHA256_RE.match(blob.name) and blob.name != sha:
        raise CheckpointError(
            f"{path}: the cached file's sha256 is {sha}, but the hub stored it as {blob.name} (its ETag, the "
            f"sha256 of the uploaded file): the cache is corrupt (a partial copy?). Delete {blob} and fetch again")
    got = HubFile(ref.repo_id, ref.filename, ref.revision or "main", commit, sha, os.path.getsize(path), path,
                  downloaded=not cached)
    if lock is not None:
        lock.check(got, ref)
    return got


def _size_words(n: int | None) -> str:
    if not n:
        return "size unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


class WeightsLock:
    """The commit and sha256 each hub revision resolved to when a sweep first fetched it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                raw = json.loads(self.path.read_text())
                self.entries = dict(raw["weights"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{self.path}: not a weights lock file ({type(e).__name__}: {e}); expected "
                                      "JSON {\"weights\": {\"OWNER/NAME@REV:FILE\": {commit, sha256, ...}}}. Fix "
                                      "or delete it (it is re-made from what the hub serves now)") from None

    def pinned(self, ref: HubRef) -> dict[str, Any] | None:
        return self.entries.get(ref.key)

    def check_commit(self, ref: HubRef, commit: str) -> None:
        """An error when ``ref``'s revision now names another commit than the lock pinned."""
        pin = self.pinned(ref)
        if pin is not None and pin.get("commit") != commit:
            raise CheckpointError(
                f"{ref.repo_id} revision {ref.revision or 'main'!r} now resolves to commit {commit[:12]}, but "
                f"{self.path} pinned commit {str(pin.get('commit'))[:12]} (sha256 {str(pin.get('sha256'))[:12]}, "
                f"fetched {pin.get('fetched')}): the weights behind this name changed, so the sweep's cells would "
                f"not be the same model. To keep the pinned model write `revision: {pin.get('commit')}` in the "
                f"sweep file; to move to the new one on purpose, delete the entry {ref.key!r} from {self.path} "
                f"(cells already finished keep the old model: start a new output folder)")

    def check(self, got: HubFile, ref: HubRef) -> None:
        """An error when ``got`` is not what the lock pinned for ``ref`` (commit, then content)."""
        pin = self.pinned(ref)
        if pin is None:
            return
        self.check_commit(ref, got.commit)
        if pin.get("sha256") != got.sha256:
            raise CheckpointError(
                f"{got.path}: sha256 {got.sha256[:12]} differs from the {pin.get('sha256', '')[:12]} pinned in "
                f"{self.path} for commit {got.commit[:12]} of {ref.repo_id}: the cached file is not the one "
                f"fetched before. Delete it from the cache and fetch again")

    def add(self, got: HubFile, ref: HubRef) -> bool:
        """Pin ``got`` (True when it was not pinned yet)."""
        if ref.key in self.entries:
            return False
        self.entries[ref.key] = {"repo_id": got.repo_id, "filename": got.filename, "revision": got.revision,
                                 "commit": got.commit, "sha256": got.sha256, "size": got.size,
                                 "fetched": time.strftime("%Y-%m-%dT%H:%M:%S")}
        return True

    def save(self) -> None:
        from .results import atomic_write_json

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"about": "fourm-eval: the hub commit and sha256 each weights revision of this "
                                               "sweep resolved to when first fetched (fourm_eval/hub.py)",
                                      "weights": dict(sorted(self.entries.items()))})


__all__ = ["HubFile", "HubRef", "WeightsLock", "fetch", "is_offline", "parse_hub_spec", "probe", "set_offline"]
