"""`fourm-eval data download`: resume, verification, rejection, extraction, idempotence, mirrors.

Everything is served by a local HTTP server on 127.0.0.1 (no other network): small files in the
real release formats (COCO zips built from the mini COCO generator, a MATLAB v7.3 NYUv2 labelled
file + splits.mat), reached through the catalogue's own URLs with the mirror override.
"""

import hashlib
import io
import json
import re
import socket
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fourm_eval.cli import app
from fourm_eval.data import download as dl
from fourm_eval.data.coco_mini import make_mini_coco
from fourm_eval.errors import ChecksumError, DownloadError


class _State:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.break_after: dict[str, int] = {}   # path -> bytes sent before the first answer is cut
        self.ignore_range = False
        self.requests: list[tuple[str, str]] = []  # (path, Range header or "")


class _Handler(BaseHTTPRequestHandler):
    state: _State

    def log_message(self, *args):
        pass

    def do_GET(self):
        st = self.state
        rng = self.headers.get("Range") or ""
        st.requests.append((self.path, rng))
        data = st.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, status = 0, 200
        m = re.fullmatch(r"bytes=(\d+)-", rng)
        if m and not st.ignore_range:
            start, status = int(m.group(1)), 206
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = st.break_after.pop(self.path, None)
        if cut is not None:   # the connection breaks mid-file
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    state = _State()
    handler = type("H", (_Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield state, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FOURM_EVAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def coco_release(tmp_path_factory):
    """The three COCO 2017 zips in the official layout, built from a tiny mini COCO."""
    src = make_mini_coco(tmp_path_factory.mktemp("coco-src"), n_train=3, n_val=2)
    def folder(sub):
        return {f"{sub}/{p.name}": p.read_bytes() for p in sorted((src / sub).iterdir())}
    return {"annotations_trainval2017.zip": _zip(folder("annotations")),
            "val2017.zip": _zip(folder("val2017")), "train2017.zip": _zip(folder("train2017"))}


def _sources(release, recipe="coco", **wrong):
    """The catalogue's sources with the test files' sizes and sha256 (``wrong={name: sha}`` overrides)."""
    out = []
    for s in dl.CATALOGUE[recipe].sources:
        data = release[s.filename]
        out.append(dl.Source(s.url, s.filename, len(data), "sha256",
                             wrong.get(s.filename, hashlib.sha256(data).hexdigest()), "test files", s.unpack))
    return out


def _serve(state, release, recipe="coco"):
    state.files.clear()
    state.requests.clear()
    state.break_after.clear()
    state.ignore_range = False
    for s in dl.CATALOGUE[recipe].sources:
        state.files[dl.urllib.parse.urlsplit(s.url).path] = release[s.filename]


def _path(filename, recipe="coco"):
    return next(dl.urllib.parse.urlsplit(s.url).path for s in dl.CATALOGUE[recipe].sources if s.filename == filename)


def test_download_extract_check_then_rerun_does_nothing(server, coco_release, tmp_path):
    state, url = server
    _serve(state, coco_release)
    logs = []
    res = dl.download("coco-det", tmp_path / "coco", sources=_sources(coco_release), mirror=url, log=logs.append,
                      backoff=0)
    root = tmp_path / "coco"
    assert res.data_root == root and not res.already_complete and not res.unverified
    assert res.check == "coco-det: 3 training / 2 validation images"
    assert (root / "annotations" / "instances_val2017.json").is_file() and len(list((root / "train2017").iterdir())) == 3
    manifest = json.loads((root / dl.MANIFEST).read_text())
    assert [f["verified"] for f in manifest["files"]] == [True] * 3
    assert all(f["url"].startswith(url + "/") for f in manifest["files"])
    assert any("sha256 matches the published value" in m for m in logs)
    assert not list((root / ".download").glob("*.part")) and not (root / ".download" / "rejected").exists()

    n_requests, logs = len(state.requests), []
    t0 = time.time()
    res2 = dl.download("coco", root, sources=_sources(coco_release), mirror=url, log=logs.append)
    assert res2.already_complete and res2.check == res.check and time.time() - t0 < 5
    assert len(state.requests) == n_requests            # nothing fetched again
    assert any("nothing to do" in m for m in logs)


def test_broken_connection_resumes_with_range_byte_identical(server, coco_release, tmp_path):
    state, url = server
    _serve(state, coco_release)
    path = _path("val2017.zip")
    cut = len(coco_release["val2017.zip"]) // 3
    state.break_after[path] = cut
    logs = []
    dl.download("coco", tmp_path / "d", sources=_sources(coco_release), mirror=url, log=logs.append, backoff=0)
    assert [r for p, r in state.requests if p == path] == ["", f"bytes={cut}-"]
    assert any(f"resuming from byte {cut:,}" in m for m in logs)
    assert (tmp_path / "d" / ".download" / "val2017.zip").read_bytes() == coco_release["val2017.zip"]


def test_server_ignoring_range_still_gives_the_right_file(server, coco_release, tmp_path):
    state, url = server
    _serve(state, coco_release)
    state.ignore_range = True
    path = _path("train2017.zip")
    state.break_after[path] = 1000
    logs = []
    res = dl.download("coco", tmp_path / "d", sources=_sources(coco_release), mirror=url, log=logs.append, backoff=0)
    assert [r for p, r in state.requests if p == path] == ["", "bytes=1000-"]   # asked to resume, got a 200
    assert any("ignored the Range request" in m for m in logs)
    assert (tmp_path / "d" / ".download" / "train2017.zip").read_bytes() == coco_release["train2017.zip"]
    assert res.check.endswith("3 training / 2 validation images")


def test_wrong_checksum_is_named_moved_aside_not_extracted_and_refetched(server, coco_release, tmp_path):
    state, url = server
    _serve(state, coco_release)
    bad = "0" * 64
    dest = tmp_path / "d"
    with pytest.raises(ChecksumError) as e:
        dl.download("coco", dest, sources=_sources(coco_release, **{"val2017.zip": bad}), mirror=url,
                    log=lambda m: None, backoff=0)
    msg = str(e.value)
    got = hashlib.sha256(coco_release["val2017.zip"]).hexdigest()
    assert "val2017.zip" in msg and bad in msg and got in msg and f"{url}/zips/val2017.zip" in msg
    rejected = dest / ".download" / "rejected" / "val2017.zip"
    assert rejected.read_bytes() == coco_release["val2017.zip"]
    assert not (dest / "val2017").exists() and not (dest / ".download" / "val2017.zip").exists()
    assert not (dest / ".download" / "val2017.zip.extracted.json").exists()
    # a rerun downloads it again (the annotations zip, already extracted, is not fetched again)
    state.requests.clear()
    res = dl.download("coco", dest, sources=_sources(coco_release), mirror=url, log=lambda m: None, backoff=0)
    assert [p for p, _ in state.requests] == [_path("val2017.zip"), _path("train2017.zip")]
    assert res.check.endswith("3 training / 2 validation images")


def test_published_size_is_checked_before_downloading(server, coco_release, tmp_path):
    state, url = server
    _serve(state, coco_release)
    srcs = _sources(coco_release)
    srcs[0] = dl.Source(srcs[0].url, srcs[0].filename, srcs[0].size + 1, "sha256", srcs[0].checksum, "test")
    with pytest.raises(DownloadError, match=r"announces .* bytes; annotations_trainval2017.zip is published as"):
        dl.download("coco", tmp_path / "d", sources=srcs, mirror=url, log=lambda m: None, backoff=0)


def test_unreachable_host_names_url_then_hand_placed_files_are_verified(coco_release, tmp_path):
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    dest = tmp_path / "d"
    with pytest.raises(DownloadError) as e:
        dl.download("coco", dest, sources=_sources(coco_release), mirror=dead, log=lambda m: None, retries=1,
                    backoff=0)
    msg = str(e.value)
    assert f"{dead}/annotations/annotations_trainval2017.zip: cannot reach the host" in msg
    assert str(dest / ".download" / "annotations_trainval2017.zip") in msg and "--mirror" in msg
    for name, data in coco_release.items():   # the user fetched them by other means
        (dest / ".download" / name).write_bytes(data)
    logs = []
    res = dl.download("coco", dest, sources=_sources(coco_release), mirror=dead, log=logs.append, retries=0)
    assert sum("present; verifying it (not downloading)" in m for m in logs) == 3
    assert res.check.endswith("3 training / 2 validation images")


def test_unsafe_zip_entries_are_refused(tmp_path):
    for name in ("../evil.txt", "/abs/evil.txt", "a/../../evil.txt"):
        archive = tmp_path / "bad.zip"
        archive.write_bytes(_zip({"ok.txt": b"x", name: b"evil"}))
        with pytest.raises(DownloadError, match="unsafe archive entry"):
            dl.extract_zip(archive, tmp_path / "out")
        assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "ok.txt").exists()


def test_mirror_url():
    u = "http://images.cocodataset.org/zips/val2017.zip"
    assert dl.mirror_url(u, None) == u
    assert dl.mirror_url(u, "https://m.example:8443/coco/") == "https://m.example:8443/coco/zips/val2017.zip"


def test_nyu_command_with_mirror_records_unverified_files(server, tmp_path, monkeypatch):
    """One CLI run: NYUv2 has no published checksum, so the files are recorded, loudly not verified,
    then converted and checked; ImageNet prints its steps with its own exit status."""
    from test_nyu_data import _write_official

    state, url = server
    labelled, splits = _write_official(tmp_path)
    release = {"nyu_depth_v2_labeled.mat": labelled.read_bytes(), "splits.mat": splits.read_bytes()}
    _serve(state, release, "nyu")
    dest = tmp_path / "nyu-dl"
    monkeypatch.setenv(dl.MIRROR_ENV, url)
    r = CliRunner().invoke(app, ["data", "download", "nyu", str(dest), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "could NOT be verified" in r.output and "nyu-depth: 2 training / 3 validation images" in r.output
    assert f"--data-root {dest / 'nyu'}" in r.output
    manifest = json.loads((dest / dl.MANIFEST).read_text())
    assert manifest["unverified"] == ["nyu_depth_v2_labeled.mat", "splits.mat"]
    assert manifest["files"][0]["sha256"] == hashlib.sha256(release["nyu_depth_v2_labeled.mat"]).hexdigest()
    assert (dest / "nyu" / "NYU_CONVERTED").is_file()

    r = CliRunner().invoke(app, ["data", "download", "imagenet", str(tmp_path / "in1k")])
    assert r.exit_code == dl.MANUAL_EXIT_CODE, r.output
    assert "ILSVRC2012_img_train.tar" in r.output and f"fourm-eval data check imagenet {tmp_path / 'in1k'}" in r.output


def test_imagenet_val_to_folders(tmp_path):
    import scipy.io

    synsets = np.zeros((3,), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for i, (wnid, kids) in enumerate((("n01440764", 0), ("n01443537", 0), ("n00001740", 2))):
        synsets[i] = (i + 1, wnid, kids)
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    devkit = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(devkit, "w:gz") as tf:
        for name, data in (("meta.mat", meta.getvalue()), ("ILSVRC2012_validation_ground_truth.txt", b"2\n1\n2\n")):
            info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/data/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    val = tmp_path / "val"
    val.mkdir()
    for k in (1, 2, 3):
        (val / f"ILSVRC2012_val_{k:08d}.JPEG").write_bytes(b"jpeg")
    assert dl.imagenet_val_to_folders(val, devkit) == 3
    assert sorted(p.relative_to(val).as_posix() for p in val.rglob("*.JPEG")) == [
        "n01440764/ILSVRC2012_val_00000002.JPEG", "n01443537/ILSVRC2012_val_00000001.JPEG",
        "n01443537/ILSVRC2012_val_00000003.JPEG"]
    assert dl.imagenet_val_to_folders(val, devkit) == 0
