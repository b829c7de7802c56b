import os

import numpy as np
import pytest
from PIL import Image

from auditor.data import check_artifacts, load_probe_set, read_label_matrix
from auditor.errors import DataError


def _setup(tmp_path, rows, header="path,a,b"):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("x.png", "y.png", "z.png"):
        Image.new("RGB", (4, 4)).save(images / name)
    labels = tmp_path / "labels.csv"
    labels.write_text(header + "\n" + "\n".join(rows) + "\n")
    return images, labels


def test_loads_wide_csv(tmp_path):
    images, labels = _setup(tmp_path, ["x.png,1,0", "y.png,0,1", "z.png,1,1"])
    probe = load_probe_set(images, labels)
    assert probe.paths == ["x.png", "y.png", "z.png"]
    assert probe.concepts == ["a", "b"]
    assert probe.labels.tolist() == [[True, False], [False, True], [True, True]]
    fp = probe.fingerprint()
    os.utime(images / "x.png", ns=(1, 1))
    assert probe.fingerprint() != fp  # an image changed (mtime) -> new fingerprint


@pytest.mark.parametrize("rows, pattern", [
    (["x.png,1,0", "y.png,2,1"], r"line 3, column 'a': value '2' is not 0 or 1"),
    (["x.png,1,0", "y.png,yes,1"], r"value 'yes' is not 0 or 1"),
    (["x.png,1,0", "x.png,0,1"], r"'x.png' is listed twice \(lines 2 and 3\)"),
    (["x.png,1,0", "../y.png,0,1"], r"escapes the image folder"),
    (["x.png,1,0", "/etc/passwd,0,1"], r"is absolute"),
    (["x.png,1,0", "nope.png,0,1"], r"1 image\(s\) listed .* missing .*'nope.png'"),
    (["x.png,1"], r"line 2: 2 fields, the header has 3"),
])
def test_bad_labels(tmp_path, rows, pattern):
    images, labels = _setup(tmp_path, rows)
    with pytest.raises(DataError, match=pattern):
        load_probe_set(images, labels)


def test_symlink_out_of_root_is_refused(tmp_path):
    images, labels = _setup(tmp_path, ["x.png,1,0", "link.png,0,1"])
    outside = tmp_path / "outside.png"
    Image.new("RGB", (4, 4)).save(outside)
    (images / "link.png").symlink_to(outside)
    with pytest.raises(DataError, match="resolves outside the image folder"):
        load_probe_set(images, labels)


def test_header_problems(tmp_path):
    images, labels = _setup(tmp_path, ["x.png,1,0"], header="path,a,a")
    with pytest.raises(DataError, match="concept 'a' appears twice"):
        load_probe_set(images, labels)
    labels.write_text("path\nx.png\n")
    with pytest.raises(DataError, match="no concept columns"):
        load_probe_set(images, labels)
    labels.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_probe_set(images, labels)
    with pytest.raises(DataError, match="image folder not found"):
        load_probe_set(tmp_path / "nope", labels)
    with pytest.raises(DataError, match="unsupported labels format"):
        load_probe_set(images, images / "x.png")


def test_artifact_checks(tmp_path):
    images, labels = _setup(tmp_path, ["x.png,1,0", "y.png,0,0", "z.png,1,0"], header="path,watermark,text")
    probe = load_probe_set(images, labels)
    check_artifacts(probe, ["watermark"])
    with pytest.raises(DataError, match=r"'watermak' is not a concept.*did you mean 'watermark'"):
        check_artifacts(probe, ["watermak"])
    with pytest.raises(DataError, match="'text' has no positive image"):
        check_artifacts(probe, ["text"])


def test_read_label_matrix_formats(tmp_path):
    import pandas as pd

    dense = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=bool)
    np.savez(tmp_path / "d.npz", labels=dense, concepts=np.array(["a", "b", "c"]))
    _, names, lab = read_label_matrix(tmp_path / "d.npz")
    assert names == ["a", "b", "c"] and (lab == dense).all()
    import scipy.sparse as sp

    csr = sp.csr_matrix(dense)
    np.savez(tmp_path / "s.npz", indptr=csr.indptr, indices=csr.indices, shape=np.array(csr.shape),
             concepts=np.array(["a", "b", "c"]))
    _, _, lab = read_label_matrix(tmp_path / "s.npz")
    assert (lab.toarray() == dense).all()
    df = pd.DataFrame(dense.astype(int), columns=["a", "b", "c"])
    df.insert(0, "path", ["p1", "p2", "p3"])
    df.to_parquet(tmp_path / "l.parquet")
    paths, names, lab = read_label_matrix(tmp_path / "l.parquet")
    assert paths == ["p1", "p2", "p3"] and (lab == dense).all()
    df.iloc[1, 2] = 3
    df.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"row 2, column 'b': value 3 is not 0 or 1"):
        read_label_matrix(tmp_path / "bad.csv")
