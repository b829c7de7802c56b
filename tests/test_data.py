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


# -- validation at the boundary (every format goes through the same checks) ----------------

def test_symlinked_folder_out_of_root_is_refused(tmp_path):
    images, labels = _setup(tmp_path, ["x.png,1,0", "linked/o.png,0,1"])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (4, 4)).save(outside / "o.png")
    (images / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DataError, match="resolves outside the image folder .*symbolic link on the way"):
        load_probe_set(images, labels)


def test_symlink_inside_root_is_fine(tmp_path):
    images, labels = _setup(tmp_path, ["x.png,1,0", "alias.png,0,1"])
    (images / "alias.png").symlink_to(images / "y.png")
    assert load_probe_set(images, labels).paths == ["x.png", "alias.png"]


@pytest.mark.parametrize("rows, pattern", [
    (["x.png,1,0", "sub/../y.png,0,1"], r"escapes the image folder"),
    (["x.png,1,0", "C:\\data\\y.png,0,1"], r"is absolute"),
    (["x.png,1,0", " ,0,1"], r"line 3: empty image path"),
    (["x.png,1,0", "./x.png,0,1"], r"'x.png' is listed twice \(lines 2 and 3\)"),
    (["x.png,1,0", ".,0,1"], r"names the image folder itself"),
])
def test_more_bad_paths(tmp_path, rows, pattern):
    images, labels = _setup(tmp_path, rows)
    with pytest.raises(DataError, match=pattern):
        load_probe_set(images, labels)


def test_folder_listed_as_image(tmp_path):
    images, labels = _setup(tmp_path, ["x.png,1,0", "sub,0,1"])
    (images / "sub").mkdir()
    with pytest.raises(DataError, match="'sub' is not a file"):
        load_probe_set(images, labels)


def test_missing_images_are_counted_and_listed(tmp_path):
    images, labels = _setup(tmp_path, ["x.png,1,0"] + [f"m{i}.png,0,1" for i in range(7)])
    with pytest.raises(DataError, match=r"7 image\(s\) .* 'm0.png', .* and 2 more \(first at .*line 3\)"):
        load_probe_set(images, labels)


def test_empty_concept_set(tmp_path):
    images, _ = _setup(tmp_path, ["x.png,1,0"])
    long = tmp_path / "long.csv"
    long.write_text("path,concept\nx.png,\ny.png,\n")
    with pytest.raises(DataError, match="concept set is empty"):
        load_probe_set(images, long)


def test_labels_folder_and_missing_file(tmp_path):
    images, _ = _setup(tmp_path, ["x.png,1,0"])
    with pytest.raises(DataError, match="is a folder, not a file"):
        load_probe_set(images, images)
    with pytest.raises(DataError, match="labels file not found"):
        load_probe_set(images, tmp_path / "nope.csv")


def test_wide_csv_line_numbers_skip_blank_lines(tmp_path):
    images, labels = _setup(tmp_path, ["x.png,1,0", "", "y.png,1,7"])
    with pytest.raises(DataError, match=r"line 4, column 'b': value '7' is not 0 or 1"):
        load_probe_set(images, labels)


def test_artifact_checks_on_sparse_labels(tmp_path):
    images, _ = _setup(tmp_path, ["x.png,1,0"])
    long = tmp_path / "long.csv"
    long.write_text("path,concept\nx.png,watermark\ny.png,dog\nz.png,dog\nz.png,everywhere\nx.png,everywhere\n"
                    "y.png,everywhere\n")
    probe = load_probe_set(images, long)
    check_artifacts(probe, ["watermark"])
    with pytest.raises(DataError, match=r"'watermak' is not a concept in .*long.csv.*did you mean 'watermark'"):
        check_artifacts(probe, ["watermak"])
    with pytest.raises(DataError, match="'everywhere' is positive on every image"):
        check_artifacts(probe, ["everywhere"])


# -- ProbeSet with sparse labels and synthesised pairs ---------------------------------------

def _paired_probe(tmp_path):
    images = tmp_path / "images"
    for name in ("clean/a.png", "clean/b.png", "clean/c.png", "wm/a.png", "wm/c.png", "tx/b.png"):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(images / name)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,concept,source\nclean/a.png,dog,\nclean/b.png,,\nclean/c.png,watermark,\n"
                      "wm/a.png,dog,clean/a.png\nwm/a.png,watermark,clean/a.png\n"
                      "wm/c.png,watermark,clean/c.png\n"  # its source already has it: no pair
                      "tx/b.png,text,clean/b.png\n")
    return load_probe_set(images, labels)


def test_pairs_from_source_column(tmp_path):
    probe = _paired_probe(tmp_path)
    rows = {p: i for i, p in enumerate(probe.paths)}
    assert probe.pairs["watermark"].tolist() == [[rows["clean/a.png"], rows["wm/a.png"]]]
    assert probe.pairs["text"].tolist() == [[rows["clean/b.png"], rows["tx/b.png"]]]
    assert set(probe.pairs) == {"watermark", "text"}
    assert probe.source_rows.tolist() == [-1, -1, -1, 0, 2, 1]
    assert probe.clean_rows.tolist() == [0, 1, 2]
    assert probe.provenance()["pairs"] == {"watermark": 1, "text": 1}


def test_subset_keeps_pairs_aligned(tmp_path):
    probe = _paired_probe(tmp_path)
    sub = probe.subset(np.array([True, False, True, True, True, True]))  # clean/b.png unreadable
    assert sub.paths == ["clean/a.png", "clean/c.png", "wm/a.png", "wm/c.png", "tx/b.png"]
    assert sub.pairs["watermark"].tolist() == [[0, 2]]
    assert sub.pairs["text"].shape == (0, 2)  # its clean half is gone
    assert sub.row_concepts(2) == ["dog", "watermark"]
    assert sub.source_rows.tolist() == [-1, -1, 0, 1, -2]
    assert sub.clean_rows.tolist() == [0, 1]  # the orphaned copy is not a clean image
    assert sub.labels.shape == (5, 3)


def test_source_errors(tmp_path):
    images, _ = _setup(tmp_path, ["x.png,1,0"])
    lab = tmp_path / "w.csv"
    lab.write_text("path,source,a\nx.png,,1\ny.png,ghost.png,0\n")
    with pytest.raises(DataError, match="source 'ghost.png' of image 'y.png' is not an image of the labels file"):
        load_probe_set(images, lab)
    lab.write_text("path,source,a\nx.png,,1\ny.png,x.png,0\nz.png,y.png,1\n")
    with pytest.raises(DataError, match="is itself a synthesised copy"):
        load_probe_set(images, lab)
    lab.write_text("path,source,a\nx.png,x.png,1\n")
    with pytest.raises(DataError, match="names itself as its source"):
        load_probe_set(images, lab)


def test_sparse_probe_methods(tmp_path):
    probe = _paired_probe(tmp_path)
    import scipy.sparse as sp

    assert sp.issparse(probe.labels) and probe.is_sparse
    assert probe.n_positive().tolist() == [2, 3, 1]
    assert probe.column_values("text").tolist() == [False, False, False, False, False, True]
    fp = probe.fingerprint()
    assert fp == probe.fingerprint() and len(fp) == 64
    with pytest.raises(DataError, match="unknown concept 'dgo'.*did you mean 'dog'"):
        probe.column("dgo")


def test_path_checks_in_large_folders(tmp_path):
    """Folders with many listed files are listed once (scandir) instead of stat'ed per file."""
    images = tmp_path / "images"
    (images / "big").mkdir(parents=True)
    names = [f"big/{i:03d}.png" for i in range(40)]
    for n in names:
        (images / n).write_bytes(b"")
    labels = tmp_path / "l.csv"
    labels.write_text("path,a\n" + "".join(f"{n},{i % 2}\n" for i, n in enumerate(names)))
    assert load_probe_set(images, labels).paths == names
    outside = tmp_path / "o.png"
    outside.write_bytes(b"")
    (images / "big" / "020.png").unlink()
    (images / "big" / "020.png").symlink_to(outside)
    with pytest.raises(DataError, match=r"line 22: image path 'big/020.png' resolves outside"):
        load_probe_set(images, labels)
    (images / "big" / "020.png").unlink()
    (images / "big" / "020.png").symlink_to(images / "big" / "000.png")  # inside: fine
    load_probe_set(images, labels)
    (images / "big" / "020.png").unlink()
    (images / "big" / "020.png").mkdir()
    with pytest.raises(DataError, match="'big/020.png' is not a file"):
        load_probe_set(images, labels)
    (images / "big" / "020.png").rmdir()
    (images / "big" / "031.png").unlink()
    with pytest.raises(DataError, match=r"2 image\(s\) .*'big/020.png', 'big/031.png' \(first at .*line 22\)"):
        load_probe_set(images, labels)
