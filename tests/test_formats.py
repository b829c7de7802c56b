"""Label formats, auto-detection and concept hierarchies (fixtures made here, tiny)."""

import csv
import json

import numpy as np
import pytest
import scipy.sparse as sp
from PIL import Image

from auditor.data import load_probe_set
from auditor.errors import DataError
from auditor.formats import Hierarchy, LabelTable, detect_format, expand, read_hierarchy


def _images(root, names):
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(p)
    return root


def _dense(probe):
    Y = probe.labels
    return Y.toarray() if sp.issparse(Y) else np.asarray(Y)


def _table(probe):
    """{path: sorted positive concepts}."""
    return {p: probe.row_concepts(i) for i, p in enumerate(probe.paths)}


# -- long CSV / Parquet ---------------------------------------------------------------

def test_long_csv(tmp_path):
    images = _images(tmp_path / "im", ["a.png", "b.png", "sub/c.png", "d.png"])
    lab = tmp_path / "long.csv"
    lab.write_text("path,concept\na.png,dog\na.png,grass\nb.png,cat\nsub/c.png,dog\n"
                   "a.png,dog\n"  # repeated pair (e.g. two instances) counts once
                   "d.png,\n"  # listed, no concept
                   ".\\sub\\c.png,grass\n")  # another spelling of sub/c.png
    probe = load_probe_set(images, lab)
    assert probe.labels_format == "long csv"
    assert sp.issparse(probe.labels) and probe.labels.dtype == bool
    assert probe.paths == ["a.png", "b.png", "sub/c.png", "d.png"]
    assert probe.concepts == ["dog", "grass", "cat"]
    assert _table(probe) == {"a.png": ["dog", "grass"], "b.png": ["cat"], "sub/c.png": ["dog", "grass"],
                             "d.png": []}
    assert probe.dense_columns(["cat", "dog"]).tolist() == [[False, True], [True, False], [False, True],
                                                            [False, False]]


def test_long_csv_value_column_and_aliases(tmp_path):
    images = _images(tmp_path / "im", ["a.png", "b.png"])
    lab = tmp_path / "l.csv"
    lab.write_text("image,label,value\na.png,dog,1\nb.png,dog,0\nb.png,cat,true\n")
    probe = load_probe_set(images, lab)
    assert _table(probe) == {"a.png": ["dog"], "b.png": ["cat"]}
    lab.write_text("image,label,value\na.png,dog,1\nb.png,dog,0.5\n")
    with pytest.raises(DataError, match=r"line 3, column 'value': value '0.5' is not 0 or 1"):
        load_probe_set(images, lab)


def test_long_row_naming_missing_image(tmp_path):
    images = _images(tmp_path / "im", ["a.png"])
    lab = tmp_path / "l.csv"
    lab.write_text("path,concept\na.png,dog\n\nghost.png,cat\n")
    with pytest.raises(DataError, match=r"1 image\(s\) listed in .*l.csv are missing .*'ghost.png' "
                                        r"\(first at .*l.csv line 4\)"):
        load_probe_set(images, lab)


def test_long_source_must_agree(tmp_path):
    images = _images(tmp_path / "im", ["a.png", "b.png", "c.png"])
    lab = tmp_path / "l.csv"
    lab.write_text("path,concept,source\na.png,dog,\nb.png,dog,a.png\nb.png,wm,c.png\nc.png,,\n")
    with pytest.raises(DataError, match="has source 'c.png' here but 'a.png' on line 3"):
        load_probe_set(images, lab)


@pytest.mark.parametrize("layout", ["wide", "long"])
def test_parquet(tmp_path, layout):
    import pandas as pd

    images = _images(tmp_path / "im", ["a.png", "b.png", "c.png"])
    if layout == "wide":
        df = pd.DataFrame({"path": ["a.png", "b.png", "c.png"], "dog": [1, 0, 1], "cat": [False, True, False]})
    else:
        df = pd.DataFrame({"path": ["a.png", "b.png", "c.png", "a.png"], "concept": ["dog", "cat", "dog", None]})
        df["concept"] = df["concept"].astype("category")  # dictionary-encoded column
    df.to_parquet(tmp_path / "l.parquet")
    probe = load_probe_set(images, tmp_path / "l.parquet")
    assert probe.labels_format == f"{layout} parquet"
    assert sp.issparse(probe.labels) == (layout == "long")
    assert _table(probe) == {"a.png": ["dog"], "b.png": ["cat"], "c.png": ["dog"]}


def test_wide_parquet_bad_value(tmp_path):
    import pandas as pd

    images = _images(tmp_path / "im", ["a.png", "b.png"])
    pd.DataFrame({"path": ["a.png", "b.png"], "dog": [1, 2]}).to_parquet(tmp_path / "l.parquet")
    with pytest.raises(DataError, match=r"row 2, column 'dog': value 2 is not 0 or 1"):
        load_probe_set(images, tmp_path / "l.parquet")


def test_npz_with_paths(tmp_path):
    images = _images(tmp_path / "im", ["a.png", "b.png"])
    csr = sp.csr_matrix(np.array([[1, 0], [1, 1]], dtype=bool))
    np.savez(tmp_path / "l.npz", indptr=csr.indptr, indices=csr.indices, shape=np.array(csr.shape),
             concepts=np.array(["x", "y"]), paths=np.array(["a.png", "b.png"]))
    probe = load_probe_set(images, tmp_path / "l.npz")
    assert _table(probe) == {"a.png": ["x"], "b.png": ["x", "y"]}
    np.savez(tmp_path / "n.npz", labels=csr.toarray(), concepts=np.array(["x", "y"]))
    with pytest.raises(DataError, match="no 'paths' array"):
        load_probe_set(images, tmp_path / "n.npz")


# -- class folders ------------------------------------------------------------------------

def test_class_folders(tmp_path):
    root = _images(tmp_path / "im", ["dog/1.png", "dog/deep/2.jpg", "cat/3.png", "loose.png",
                                     ".hidden/4.png", "cat/.5.png"])
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    probe = load_probe_set(root, None)
    assert probe.labels_format == "folders" and sp.issparse(probe.labels)
    assert probe.concepts == ["cat", "dog", "empty"]
    assert _table(probe) == {"cat/3.png": ["cat"], "dog/1.png": ["dog"], "dog/deep/2.jpg": ["dog"],
                             "loose.png": []}
    assert any("belong to no class" in w for w in probe.warnings)
    assert probe.labels_file is None
    probe.fingerprint()


def test_class_folder_symlink_out_is_refused(tmp_path):
    root = _images(tmp_path / "im", ["dog/1.png"])
    outside = _images(tmp_path / "out", ["x.png"])
    (root / "cat").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DataError, match="'cat' in the image folder .* resolves outside"):
        load_probe_set(root, None)


def test_flat_folder_without_labels(tmp_path):
    root = _images(tmp_path / "im", ["a.png"])
    with pytest.raises(DataError, match="no labels file given and .* has no class folders"):
        load_probe_set(root, None)
    with pytest.raises(DataError, match="concept set is empty"):
        load_probe_set(root, None, labels_format="folders")


# -- COCO -----------------------------------------------------------------------------------

def _coco(tmp_path, **over):
    data = {
        "images": [{"id": 10, "file_name": "a.jpg"}, {"id": 11, "file_name": "b.jpg"},
                   {"id": 12, "file_name": "c.jpg"}, {"id": 13, "file_name": "d.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 1, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 1, "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 2, "iscrowd": 1},  # crowd: still present
            {"id": 4, "image_id": 11, "category_id": 3, "iscrowd": 0},
            {"id": 5, "image_id": 12, "category_id": 4, "iscrowd": 0},
        ],  # image 13 has no annotation
        "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 2, "name": "dog", "supercategory": "animal"},
                       {"id": 3, "name": "cat", "supercategory": "animal"},
                       {"id": 4, "name": "car", "supercategory": "vehicle"}],
    }
    data.update(over)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    _images(tmp_path / "im", [im["file_name"] for im in data["images"]])
    return tmp_path / "im", path


def test_coco(tmp_path):
    images, ann = _coco(tmp_path)
    probe = load_probe_set(images, ann)
    assert probe.labels_format == "coco" and sp.issparse(probe.labels)
    assert probe.concepts == ["person", "dog", "cat", "car", "animal", "vehicle"]
    assert _table(probe) == {"a.jpg": ["person"], "b.jpg": ["dog", "cat", "animal"],
                             "c.jpg": ["car", "vehicle"], "d.jpg": []}
    assert "dog" in probe.descriptions["animal"] and "cat" in probe.descriptions["animal"]
    assert any("no annotation" in w for w in probe.warnings)


def test_coco_supercategory_named_like_another_category(tmp_path):
    cats = [{"id": 1, "name": "animal", "supercategory": "animal"}, {"id": 2, "name": "dog", "supercategory": "animal"}]
    anns = [{"id": 1, "image_id": 10, "category_id": 2}]
    images, ann = _coco(tmp_path, categories=cats, annotations=anns)
    probe = load_probe_set(images, ann)
    assert probe.concepts == ["animal", "dog", "animal (supercategory)"]
    assert probe.row_concepts(0) == ["dog", "animal (supercategory)"]


@pytest.mark.parametrize("over, pattern", [
    ({"annotations": [{"image_id": 99, "category_id": 1}]}, r"annotations\[0\] names image id 99"),
    ({"annotations": [{"image_id": 10, "category_id": 7}]}, r"annotations\[0\] names category id 7"),
    ({"categories": []}, "no categories: the concept set is empty"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "a.jpg"}], "annotations": []},
     r"'a.jpg' is listed twice \(images\[0\] \(id 1\) and images\[1\] \(id 2\)\)"),
    ({"images": [{"id": 1, "file_name": "../a.jpg"}], "annotations": []}, "escapes the image folder"),
])
def test_coco_errors(tmp_path, over, pattern):
    images, ann = _coco(tmp_path, **over)
    with pytest.raises(DataError, match=pattern):
        load_probe_set(images, ann)


def test_coco_not_coco(tmp_path):
    (tmp_path / "im").mkdir()
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(DataError, match="not a COCO instances file"):
        load_probe_set(tmp_path / "im", tmp_path / "x.json")


# -- detection ------------------------------------------------------------------------------

def test_detect_format(tmp_path):
    (tmp_path / "w.csv").write_text("path,dog,cat\n")
    (tmp_path / "l.csv").write_text("\ufeffimage,concept,source\n")
    (tmp_path / "c.csv").write_text("path,concept,dog\n")  # a concept named 'concept' → wide
    assert detect_format(tmp_path, tmp_path / "w.csv") == "wide"
    assert detect_format(tmp_path, tmp_path / "l.csv") == "long"
    assert detect_format(tmp_path, tmp_path / "c.csv") == "wide"
    assert detect_format(tmp_path, tmp_path / "l.csv", "wide") == "wide"
    assert detect_format(tmp_path, None) == "folders"
    assert detect_format(tmp_path, tmp_path / "a.json") == "coco"
    with pytest.raises(DataError, match="unknown labels_format 'csv'"):
        detect_format(tmp_path, tmp_path / "w.csv", "csv")
    with pytest.raises(DataError, match="unsupported labels format '.txt'"):
        detect_format(tmp_path, tmp_path / "w.txt")


def test_labels_format_override(tmp_path):
    images = _images(tmp_path / "im", ["a.png"])
    lab = tmp_path / "l.csv"
    lab.write_text("path,concept\na.png,1\n")  # forced wide: 'concept' is a 0/1 column
    assert load_probe_set(images, lab, labels_format="wide").concepts == ["concept"]
    assert load_probe_set(images, lab).concepts == ["1"]


# -- hierarchies ---------------------------------------------------------------------------

# A small WordNet-like DAG (ids → names), 'husky' has two parents:
#   entity ─ animal ─ dog ─ husky
#                 └─ cat      └─ (working_dog ─ husky)
#          └ vehicle ─ car
EDGES = [("entity", "animal"), ("animal", "dog"), ("animal", "cat"), ("dog", "husky"), ("dog", "working_dog"),
         ("working_dog", "husky"), ("entity", "vehicle"), ("vehicle", "car"), ("entity", "plant")]
NAMES = {"entity": "entity", "animal": "animal, animate being", "dog": "dog, domestic dog", "cat": "cat",
         "husky": "Siberian husky", "working_dog": "working dog", "vehicle": "vehicle", "car": "car, auto",
         "plant": "plant"}
ANCESTORS = {"husky": {"dog", "working_dog", "animal", "entity"}, "cat": {"animal", "entity"},
             "car": {"vehicle", "entity"}, "dog": {"animal", "entity"}}


def _hier_files(tmp_path):
    files = {}
    nodes = {n: {"name": NAMES[n], "definition": f"def of {n}",
                 "children": [c for p, c in EDGES if p == n]} for n in NAMES}
    files["mapping"] = tmp_path / "h_map.json"
    files["mapping"].write_text(json.dumps(nodes))
    files["list"] = tmp_path / "h_list.json"
    files["list"].write_text(json.dumps({"nodes": [{"id": n, "name": NAMES[n], "gloss": f"def of {n}",
                                                    "parents": [p for p, c in EDGES if c == n]} for n in NAMES]}))

    def tree(n):
        return {"id": n, "name": NAMES[n], "definition": f"def of {n}", "children": [tree(c) for p, c in EDGES if p == n]}
    files["tree"] = tmp_path / "h_tree.json"
    files["tree"].write_text(json.dumps(tree("entity")))
    files["edges"] = tmp_path / "h_edges.csv"
    with open(files["edges"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["parent", "child", "name", "definition"])
        w.writerow(["", "entity", NAMES["entity"], "def of entity"])
        for p, c in EDGES:
            w.writerow([p, c, NAMES[c], f"def of {c}"])
    files["nodes"] = tmp_path / "h_nodes.csv"
    with open(files["nodes"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "parent", "name", "definition"])
        for n in NAMES:
            w.writerow([n, ";".join(p for p, c in EDGES if c == n), NAMES[n], f"def of {n}"])
    files["plain"] = tmp_path / "h_plain.json"
    plain = {}
    for p, c in EDGES:
        plain.setdefault(p, []).append(c)
    files["plain"].write_text(json.dumps(plain))
    return files


@pytest.mark.parametrize("kind", ["mapping", "list", "tree", "edges", "nodes", "plain"])
def test_hierarchy_expansion_matches_hand_computed_ancestors(tmp_path, kind):
    images = _images(tmp_path / "im", ["1.png", "2.png", "3.png", "4.png", "5.png"])
    lab = tmp_path / "l.csv"
    lab.write_text("path,husky,cat,car,watermark\n1.png,1,0,0,0\n2.png,0,1,0,1\n3.png,0,0,1,0\n"
                   "4.png,0,0,0,0\n5.png,1,1,0,0\n")
    hfile = _hier_files(tmp_path)[kind]
    probe = load_probe_set(images, lab, hierarchy=hfile)
    base = ["husky", "cat", "car", "watermark"]
    assert probe.concepts[:4] == base
    added = set(probe.concepts[4:])
    assert added == ANCESTORS["husky"] | ANCESTORS["cat"] | ANCESTORS["car"]  # 'plant' has no label: not added
    Y = _dense(probe)
    raw = {"1.png": {"husky"}, "2.png": {"cat", "watermark"}, "3.png": {"car"}, "4.png": set(),
           "5.png": {"husky", "cat"}}
    for i, p in enumerate(probe.paths):
        expected = set(raw[p])
        for c in raw[p]:
            expected |= ANCESTORS.get(c, set())
        assert {c for c, on in zip(probe.concepts, Y[i]) if on} == expected, p
    assert isinstance(probe.labels, np.ndarray)  # a dense wide table stays dense
    assert probe.hierarchy_file == str(hfile) and probe.hierarchy_sha256
    if kind != "plain":
        assert probe.display_names["husky"] == "Siberian husky"
        assert probe.display_names["working_dog"] == "working dog"
        assert probe.descriptions["animal"] == "def of animal"
    assert any("'watermark'" in w and "not in hierarchy" in w for w in probe.warnings)


def test_hierarchy_on_sparse_labels_stays_sparse(tmp_path):
    root = _images(tmp_path / "im", ["husky/1.png", "cat/2.png", "car/3.png"])
    probe = load_probe_set(root, None, hierarchy=_hier_files(tmp_path)["edges"])
    assert sp.issparse(probe.labels)
    assert set(probe.row_concepts(probe.paths.index("husky/1.png"))) == {"husky"} | ANCESTORS["husky"]


def test_hierarchy_cycle_is_named(tmp_path):
    h = tmp_path / "h.csv"
    h.write_text("parent,child\nentity,animal\nanimal,dog\ndog,animal\n")
    with pytest.raises(DataError, match=r"cycle: '(animal' → 'dog' → 'animal|dog' → 'animal' → 'dog)'"):
        expand(_tiny_table(["dog"]), read_hierarchy(h))
    h.write_text("parent,child\ndog,dog\n")
    with pytest.raises(DataError, match=r"cycle: 'dog' → 'dog'"):
        expand(_tiny_table(["dog"]), read_hierarchy(h))


def test_hierarchy_unknown_ids_are_named(tmp_path):
    h = tmp_path / "h.json"
    h.write_text(json.dumps({"animal": {"name": "animal", "children": ["dog", "dgo"]},
                             "dog": {"name": "dog"}}))
    with pytest.raises(DataError, match=r"unknown id\(s\) 'dgo' \(child of 'animal'\) \(did you mean 'dog'\?\)"):
        expand(_tiny_table(["dog"]), read_hierarchy(h))
    # an undeclared child that is a label concept is fine
    expand(_tiny_table(["dog", "dgo"]), read_hierarchy(h))
    h2 = tmp_path / "h.csv"
    h2.write_text("id,parent,name\ndog,animl,dog\nanimal,,animal\n")
    with pytest.raises(DataError, match=r"unknown id\(s\) 'animl' \(parent of 'dog'\)"):
        expand(_tiny_table(["dog"]), read_hierarchy(h2))


def test_hierarchy_without_any_label_concept(tmp_path):
    h = tmp_path / "h.csv"
    h.write_text("parent,child\nn001,n002\n")
    with pytest.raises(DataError, match="no concept of the labels is a node of hierarchy"):
        expand(_tiny_table(["dog"]), read_hierarchy(h))


@pytest.mark.parametrize("text, pattern", [
    ("a,b\n", "expected columns parent,child"),
    ("parent,child\na\n", "line 2: 1 fields"),
])
def test_hierarchy_csv_errors(tmp_path, text, pattern):
    h = tmp_path / "h.csv"
    h.write_text(text)
    with pytest.raises(DataError, match=pattern):
        read_hierarchy(h)


def test_hierarchy_file_errors(tmp_path):
    with pytest.raises(DataError, match="hierarchy file not found"):
        read_hierarchy(tmp_path / "nope.json")
    (tmp_path / "h.yaml").write_text("")
    with pytest.raises(DataError, match="unsupported hierarchy format"):
        read_hierarchy(tmp_path / "h.yaml")
    (tmp_path / "h.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="item 0 must be an object"):
        read_hierarchy(tmp_path / "h.json")


def test_expand_dense_counts_do_not_overflow():
    # 300 leaves under one root: the parent column is an OR, not a count that could wrap.
    leaves = [f"l{i}" for i in range(300)]
    table = _tiny_table(leaves, labels=np.ones((2, 300), dtype=bool))
    h = Hierarchy(parents={leaf: ["root"] for leaf in leaves}, names={}, definitions={},
                  order=["root"] + leaves, declared=None, file="h")
    out = expand(table, h)
    assert out.concepts[-1] == "root" and out.labels[:, -1].all()


def _tiny_table(concepts, labels=None):
    labels = np.zeros((1, len(concepts)), dtype=bool) if labels is None else labels
    return LabelTable(paths=[f"{i}.png" for i in range(labels.shape[0])], concepts=list(concepts), labels=labels,
                      format="wide csv", file="labels.csv")


@pytest.mark.parametrize("ids", [[10, 11, 10], ["a", "b", "a"]])
def test_coco_duplicate_image_ids(tmp_path, ids):
    images = [{"id": i, "file_name": f"{k}.jpg"} for k, i in enumerate(ids)]
    img_root, ann = _coco(tmp_path, images=images, annotations=[])
    with pytest.raises(DataError, match=r"image id .* is used twice \(images\[0\] and images\[2\]\)"):
        load_probe_set(img_root, ann)


def test_coco_string_ids(tmp_path):
    images = [{"id": "x", "file_name": "a.jpg"}, {"id": "y", "file_name": "b.jpg"}]
    cats = [{"id": "c1", "name": "dog"}, {"id": "c2", "name": "cat"}]
    anns = [{"image_id": "y", "category_id": "c1"}, {"image_id": "x", "category_id": "c2"}]
    img_root, ann = _coco(tmp_path, images=images, annotations=anns, categories=cats)
    probe = load_probe_set(img_root, ann)
    assert _table(probe) == {"a.jpg": ["cat"], "b.jpg": ["dog"]}
    bad = [{"id": "c1", "name": "dog"}, {"id": "c1", "name": "cat"}]
    img_root, ann = _coco(tmp_path, images=images, annotations=anns, categories=bad)
    with pytest.raises(DataError, match=r"category id 'c1' is used twice \(categories\[0\] and categories\[1\]\)"):
        load_probe_set(img_root, ann)


def test_formats_does_not_import_data():
    """The label readers sit below data.py: importing formats must not pull data in (no import cycle)."""
    import subprocess
    import sys

    code = "import sys, auditor.formats; print('auditor.data' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
