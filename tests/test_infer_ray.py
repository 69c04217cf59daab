"""xray-infer --engine ray on a real two-node Ray cluster on this machine (ray.cluster_utils.Cluster, fractional
CPUs): rows from both nodes, the local engine's answers, a worker node killed mid-job, a killed job resumed, resume by
hash, manifests, and the Parquet read back with pyarrow. The CLI runs in subprocesses, as a user runs it."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import INFER, run_script, xray_infer
from screenshot_page import find_rg1

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # before Ray is imported here or in a subprocess
CLASSES = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
CORRUPT = {"garbage.png": "not_an_image", "empty.jpg": "empty", "truncated.jpg": "corrupt", "bad.dcm": "bad_dicom"}
pytestmark = pytest.mark.xdist_group("ray_cluster")  # one cluster per module, on one worker


@pytest.fixture(scope="module", autouse=True)
def ray_token():
    """The clusters run with token authentication, the token in the environment (not ~/.ray/auth_token, which other
    tests or an earlier ray.init may have written): the drivers, in subprocesses, inherit it. Restored after."""
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def guarded_model(tiny_onnx, tmp_path_factory, archive):
    """tiny_onnx's network with an out-of-distribution score (the logits' spread) and a threshold at its median over
    the archive, so about half the films are flagged: the ood columns are compared, not just present."""
    import torch

    from xray.common.model_meta import ModelInfo
    from xray.export.edge_graph import OUTPUT_NAMES, EdgeGraph
    from xray.export.onnx_export import export_onnx, set_metadata
    from xray.infer.model import EdgeModel
    from xray.infer.predict import prepare_or_error

    _, model, spec, classes = tiny_onnx

    class Spread(torch.nn.Module):
        def forward(self, pooled, raw):
            return raw.max(1).values - raw.min(1).values

    path = tmp_path_factory.mktemp("ray_model") / "model.onnx"
    export_onnx(EdgeGraph(model, Spread()), spec, path, output_names=OUTPUT_NAMES)
    info = ModelInfo(classes, spec, "efficientnet_lite0", checkpoint_sha256="ab" * 32, precision="fp32",
                     ood={"threshold": 1e9})
    set_metadata(path, info.to_metadata())
    edge = EdgeModel(path, threads=1)
    arrays = [a for f in sorted(archive.rglob("*.png"))[:40] if (a := prepare_or_error(str(f), spec, 10**8)[0]) is not None]
    info.ood = {"threshold": float(np.median(edge.predict(np.stack(arrays)).ood_score))}
    set_metadata(path, info.to_metadata())
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """~200 files: synthetic PNG and JPEG films, 16-bit DICOMs, the real CR DICOM, and corrupt files."""
    import pydicom
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    root = tmp_path_factory.mktemp("ray_archive")
    run_script("make_synthetic", "--out", root / "films", "--per-class", 62, "--size", 80, "--seed", 7)
    pngs = sorted((root / "films").rglob("*.png"))
    for i, png in enumerate(pngs[:12]):  # JPEGs and DICOMs of some films, in a sub-folder of their own
        img = np.asarray(Image.open(png).convert("L"))
        (root / "other").mkdir(exist_ok=True)
        if i % 2:
            Image.fromarray(img).save(root / "other" / f"film{i}.jpg", quality=90)
            continue
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.Modality, ds.Rows, ds.Columns = "DX", *img.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelData = (img.astype(np.uint16) * 16).tobytes()
        ds.save_as(root / "other" / f"film{i}.dcm", enforce_file_format=True)
    shutil.copy(find_rg1(), root / "other" / "RG1_UNCR.dcm")
    bad = root / "other" / "bad"
    bad.mkdir()
    (bad / "garbage.png").write_bytes(b"not a picture at all")
    (bad / "empty.jpg").write_bytes(b"")
    jpg = (root / "other" / "film1.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    (bad / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x00garbage")
    assert pydicom.dcmread(root / "other" / "film0.dcm").BitsAllocated == 16
    return root


@pytest.fixture(scope="module")
def cluster():
    """A head and one worker node, one CPU each, on 127.0.0.1; shut down whatever happens."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()


def all_files(root: Path) -> list[str]:
    from xray.common.imageio import is_supported

    return sorted(str(p) for p in root.rglob("*") if p.is_file() and is_supported(p))


def ray_infer(model, out, *inputs, address=None, extra=(), check_code=None, **popen):
    cmd = [*INFER, "--engine", "ray", "--model", model, "--output", out, *extra, *inputs]
    if address:
        cmd += ["--ray-address", address]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
    if check_code is not None:
        assert proc.returncode == check_code, proc.stderr[-4000:]
    return proc


def read_rows(out: Path) -> pa.Table:
    return pq.read_table(out)  # the dataset as any reader sees it: hidden temporary files skipped


def test_rows_from_both_nodes_with_the_local_engines_answers(cluster, archive, guarded_model, tmp_path):
    out = tmp_path / "scores"
    proc = ray_infer(guarded_model, out, archive, address=cluster.address, extra=["--actors", "2"], check_code=1)
    rows = read_rows(out)
    files = all_files(archive)
    assert len(files) >= 190
    assert sorted(rows.column("path").to_pylist()) == files  # every input once
    assert len(set(rows.column("node_id").to_pylist())) == 2, "both nodes score"
    assert rows.schema.names[:4] == ["path", "size", "mtime_ns", "sha256"]
    assert [f"prob_{c}" for c in CLASSES] == [n for n in rows.schema.names if n.startswith("prob_")]
    by_path = {r["path"]: r for r in rows.to_pylist()}
    for name, kind in CORRUPT.items():
        row = by_path[str(archive / "other" / "bad" / name)]
        assert row["error_kind"] == kind and row["prediction"] is None and row["prob_NORMAL"] is None
    assert all(r["model_name"] == "efficientnet_lite0" and r["checkpoint_sha256"] == "ab" * 32
               and r["precision"] == "fp32" for r in by_path.values())
    assert all(r["size"] == os.path.getsize(p) for p, r in by_path.items())
    assert "scored %d files" % len(files) in proc.stderr and "bad_dicom 1" in proc.stderr
    assert proc.stderr.count("  node ") == 2

    local = xray_infer("--model", guarded_model, "--format", "jsonl", archive, check=False)
    assert local.returncode == 1
    expected = {r["file"]: r for r in map(json.loads, local.stdout.splitlines())}
    assert sorted(expected) == files
    flagged = 0
    for path, want in expected.items():
        got = by_path[path]
        if "error" in want:
            assert got["error"] == want["error"], path  # the same message, from the same decoder
            continue
        assert got["error"] is None and got["prediction"] == want["prediction"], path
        assert max(abs(got[f"prob_{c}"] - p) for c, p in want["probabilities"].items()) <= 1e-6, path
        assert got["ood"] == want["ood"] and abs(got["ood_score"] - want["ood_score"]) <= 1e-5 * max(1, want["ood_score"])
        flagged += got["ood"]
    assert 0 < flagged < len(files) - len(CORRUPT)
    assert f"flagged out of distribution: {flagged}" in proc.stderr


def wait_for_part(out: Path, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if list(out.glob("part-*.parquet")):
            return
        time.sleep(0.1)
    raise AssertionError(f"no part file appeared (exit {proc.poll()}): {proc.stderr.read()[-3000:] if proc.stderr else ''}")


def start(model, out, inputs, address, *extra):
    cmd = [*INFER, "--engine", "ray", "--model", model, "--output", out, "--ray-address", address, *extra, *inputs]
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def big_archive(archive, tmp_path):
    """The archive plus 60 links to the real CR DICOM (2 MP, slow to decode): a job long enough to be cut."""
    root = tmp_path / "big"
    shutil.copytree(archive, root, copy_function=os.link)
    for i in range(60):
        os.link(archive / "other" / "RG1_UNCR.dcm", root / "other" / f"cr{i:02d}.dcm")
    return root


def test_a_worker_node_killed_mid_job_the_job_completes_with_every_row_once(cluster, big_archive, guarded_model,
                                                                             tmp_path):
    extra_node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    out = tmp_path / "scores"
    proc = start(guarded_model, out, [big_archive], cluster.address, "--actors", "3", "--part-rows", "10",
                 "--batch-size", "4")
    try:
        wait_for_part(out, proc)
        assert proc.poll() is None, "the job ended before the node could be killed"
        cluster.remove_node(extra_node, allow_graceful=False)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "the Ray job failed" not in err, err[-4000:]  # 1: the corrupt files
    paths = read_rows(out).column("path").to_pylist()
    assert sorted(paths) == all_files(big_archive), "every input exactly once"


def test_an_interrupted_job_resumes_where_it_stopped_and_a_half_written_part_is_never_read(
        cluster, big_archive, guarded_model, tmp_path):
    out = tmp_path / "scores"
    proc = start(guarded_model, out, [big_archive], cluster.address, "--part-rows", "10", "--batch-size", "4")
    try:
        wait_for_part(out, proc)
        proc.send_signal(signal.SIGKILL)  # the driver dies without a word: no flush, no clean-up
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = read_rows(out).num_rows
    files = all_files(big_archive)
    assert 0 < first < len(files)
    half = out / ".part-deadbeef-00007.parquet.tmp"  # what a kill during a write leaves
    half.write_bytes(b"PAR1 cut short")

    proc = ray_infer(guarded_model, out, big_archive, address=cluster.address, check_code=1)
    assert "the Ray job failed" not in proc.stderr  # exit 1 for the corrupt files only
    assert not half.exists(), "the next run removes a killed job's temporary file"
    rows = read_rows(out)
    assert sorted(rows.column("path").to_pylist()) == files, "resumed: every input once, none twice"
    assert f"already in the output, skipped: {first}" in proc.stderr

    again = ray_infer(guarded_model, out, big_archive, address=cluster.address, check_code=0)
    assert "scored 0 files" in again.stderr and read_rows(out).num_rows == len(files)


def test_ctrl_c_commits_the_rows_scored_so_far_and_exits_130(cluster, big_archive, guarded_model, tmp_path):
    out = tmp_path / "scores"
    proc = start(guarded_model, out, [big_archive], cluster.address, "--part-rows", "10", "--batch-size", "4")
    try:
        wait_for_part(out, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    committed = read_rows(out).num_rows
    assert f"interrupted: {committed} rows committed to {out}; run the same command again" in err
    assert 0 < committed < len(all_files(big_archive)) and not list(out.glob(".part-*"))


def test_resume_by_hash_recognises_touched_files_and_path_mode_does_not(cluster, archive, guarded_model, tmp_path):
    films = tmp_path / "films"
    shutil.copytree(archive / "films" / "NORMAL", films)
    out = tmp_path / "scores"
    ray_infer(guarded_model, out, films, address=cluster.address, extra=["--resume-by", "hash"], check_code=0)
    rows = read_rows(out)
    n = rows.num_rows
    import hashlib
    assert {r["path"]: r["sha256"] for r in rows.to_pylist()} == {
        str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in films.iterdir()}
    later = time.time() + 100
    for f in films.iterdir():
        os.utime(f, (later, later))
    proc = ray_infer(guarded_model, out, films, address=cluster.address, extra=["--resume-by", "hash"], check_code=0)
    assert "scored 0 files" in proc.stderr and read_rows(out).num_rows == n
    proc = ray_infer(guarded_model, out, films, address=cluster.address, check_code=0)
    assert f"scored {n} files" in proc.stderr and read_rows(out).num_rows == 2 * n  # path + size + mtime changed
    assert read_rows(out).column("sha256").null_count == n  # path mode does not hash


def test_an_output_written_without_hashes_is_not_resumed_by_hash(tmp_path):
    from xray.common.errors import XrayError
    from xray.infer.ray_parts import PartWriter, prepare_output, row_schema

    schema = row_schema(CLASSES)
    writer = PartWriter(tmp_path, schema, part_rows=10)
    writer.add(pa.Table.from_pylist([{n: None for n in schema.names} | {"path": "/x.png", "size": 3, "mtime_ns": 5}],
                                    schema=schema))
    writer.flush()
    assert prepare_output(tmp_path, schema, "", "path") == {("/x.png", 3, 5)}
    with pytest.raises(XrayError, match=r"written without content hashes \(--resume-by path\); resume it with"):
        prepare_output(tmp_path, schema, "", "hash")


def test_manifests_and_path_lists_on_ray_started_by_the_cli(archive, guarded_model, tmp_path):
    """No --ray-address: Ray starts on this machine for the job and stops after it. The model is given as its export
    folder: shipped whole, each actor picks from it for its own CPU."""
    films = sorted((archive / "films").rglob("*.png"))[:6]
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join(map(str, films[:2])) + f"\n{tmp_path / 'gone.png'}\n")
    pq.write_table(pa.table({"file": [str(f) for f in films[2:4]]}), tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text("id,file\n" + "".join(f"{i},{f}\n" for i, f in enumerate(films[4:6])))
    uri_folder = tmp_path / "bucket"  # a URI goes through pyarrow.fs (as s3:// or gs:// would), listing and reading
    uri_folder.mkdir()
    for f in films[:2]:
        shutil.copy(f, uri_folder / f.name)
    out = tmp_path / "scores"
    proc = ray_infer(guarded_model.parent, out, f"@{listing}", tmp_path / "m.parquet", tmp_path / "m.csv",
                     f"file://{uri_folder}", f"file://{films[0]}", extra=["--path-column", "file", "-q"],
                     check_code=1)  # the last: a file:// spelling of a file listed already, scored once
    rows = {r["path"]: r for r in read_rows(out).to_pylist()}
    copies = [str(uri_folder / f.name) for f in films[:2]]  # a file:// URI is its local path: one spelling per file
    assert sorted(rows) == sorted([*map(str, films), str(tmp_path / "gone.png"), *copies])
    for copy, film in zip(copies, films):
        assert rows[copy]["prob_NORMAL"] == rows[str(film)]["prob_NORMAL"] and rows[copy]["size"] == film.stat().st_size
    assert rows[str(tmp_path / "gone.png")]["error_kind"] == "missing"
    assert "Running Dataset" not in proc.stderr  # -q: no progress output
    assert {r["precision"] for r in rows.values()} == {"fp32"}

    wrong = ray_infer(guarded_model, tmp_path / "x", tmp_path / "m.csv", check_code=2)
    assert wrong.stderr.strip().splitlines()[-1] == (f"error: {tmp_path / 'm.csv'}: no column 'path' (it has id, file); "
                                                     "pass --path-column")


def test_a_driver_without_the_clusters_token_is_refused(cluster, archive, guarded_model, tmp_path):
    cmd = [*INFER, "--engine", "ray", "--model", guarded_model, "--output", tmp_path / "x",
           "--ray-address", cluster.address, archive / "films"]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: --ray-address {cluster.address}: cannot join the Ray cluster" in proc.stderr
    assert not list((tmp_path / "x").glob("part-*"))


def test_a_malformed_address_is_one_line_and_leaves_no_output_folder(archive, guarded_model, tmp_path):
    proc = ray_infer(guarded_model, tmp_path / "x", archive / "films", address="not an address", check_code=2)
    assert "error: --ray-address not an address: cannot join the Ray cluster" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


def test_one_job_per_output_folder(tmp_path):
    from xray.common.errors import XrayError
    from xray.infer.ray_parts import lock_output

    held = lock_output(tmp_path / "scores")
    with pytest.raises(XrayError, match="another xray-infer job is writing to this folder"):
        lock_output(tmp_path / "scores")
    held.close()
    lock_output(tmp_path / "scores").close()  # free again once the first job is gone


@pytest.mark.parametrize("extra, message", [
    ((), "--engine ray: give --output FOLDER (the Parquet dataset the rows go to)"),
    (("-o", "x", "--format", "json"), "--engine ray: --format only with --engine local"),
    (("-o", "x", "--eval"), "--engine ray: --eval only with --engine local"),
    (("-o", "x", "--threads", "2"), "--engine ray: --threads (use --threads-per-actor) only with --engine local"),
    (("-o", "s3://bucket/scores"), "--output s3://bucket/scores: --engine ray writes to a local folder"),
    (("-o", "x", "--ray-address", "ray://head:10001"), "--ray-address ray://head:10001: Ray Client (ray://) cannot "
                                                        "run a Ray Data job"),
])
def test_local_only_options_are_refused_in_one_line(tiny_onnx, extra, message):
    proc = xray_infer("--engine", "ray", "--model", tiny_onnx[0], *extra, "a.png", check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_output_holding_another_models_rows_is_refused(tmp_path):
    from xray.common.errors import XrayError
    from xray.infer.ray_parts import PartWriter, prepare_output, row_schema

    schema = row_schema(CLASSES)
    out = tmp_path / "scores"
    assert prepare_output(out, schema, "a" * 64, "path") == set()
    writer = PartWriter(out, schema, part_rows=2)
    row = {n: None for n in schema.names} | {"path": "/x.png", "size": 3, "mtime_ns": 5, "sha256": "f" * 64,
                                             "checkpoint_sha256": "a" * 64}
    writer.add(pa.Table.from_pylist([row] * 3, schema=schema))
    assert [p.name for p in out.iterdir()] == [f"part-{writer.job}-00000.parquet"]  # 2 rows committed, 1 pending
    writer.flush()
    assert read_rows(out).num_rows == 3
    assert prepare_output(out, schema, "a" * 64, "path") == {("/x.png", 3, 5)}
    assert prepare_output(out, schema, "a" * 64, "hash") == {("sha256", "f" * 64)}
    with pytest.raises(XrayError, match="holds results of another model"):
        prepare_output(out, schema, "b" * 64, "path")
    with pytest.raises(XrayError, match="other columns"):
        prepare_output(out, row_schema(["A", "B"]), "a" * 64, "path")
    (tmp_path / "file").write_text("")
    with pytest.raises(XrayError, match="is a file"):
        prepare_output(tmp_path / "file", schema, "a" * 64, "path")


def test_ray_is_optional_and_ray_data_pulls_in_no_torch(tiny_onnx):
    code = ("import sys; import xray.infer.cli, xray.infer.ray_engine; assert 'ray' not in sys.modules; "
            "import ray.data; assert 'torch' not in sys.modules, 'ray.data imported torch'; print('ok')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"
    without_ray = ("import sys; sys.modules['ray'] = None; from xray.infer.cli import main; "
                   f"main(['--engine', 'ray', '--model', {str(tiny_onnx[0])!r}, '-o', 'x', 'a.png'])")
    proc = subprocess.run([sys.executable, "-c", without_ray], capture_output=True, text=True)
    assert proc.returncode == 2 and "--engine ray needs Ray: pip install 'xray-edge[ray]'" in proc.stderr


def test_a_commit_cut_short_leaves_no_file_and_never_writes_its_rows_twice(tmp_path, monkeypatch):
    import xray.infer.ray_parts as parts

    schema = parts.row_schema(CLASSES)
    writer = parts.PartWriter(tmp_path, schema, part_rows=2)
    rows = pa.Table.from_pylist([{n: None for n in schema.names} | {"path": f"/{i}.png"} for i in range(3)],
                                schema=schema)
    real_write = parts.pq.write_table

    def cut_short(table, where):
        Path(where).write_bytes(b"PAR1 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(parts.pq, "write_table", cut_short)
    with pytest.raises(KeyboardInterrupt):
        writer.add(rows)
    assert list(tmp_path.iterdir()) == []  # no half-written file left behind
    monkeypatch.setattr(parts.pq, "write_table", real_write)
    writer.flush()
    assert read_rows(tmp_path).column("path").to_pylist() == ["/2.png"]  # the cut part's rows: redone by a resume
