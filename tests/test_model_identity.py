"""The model's identity on page 1: state_dict sha256 in canonical order, parameters, file hash."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import nn

from auditor.models import load_model, state_dict_sha256


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def test_state_dict_hash_is_canonical_and_sensitive():
    a, b = _net(0), _net(0)
    assert state_dict_sha256(a) == state_dict_sha256(b)
    # same tensors registered in another order: same digest
    sd = a.state_dict()
    reordered = nn.Module()
    for name in sorted(sd, reverse=True):
        reordered.register_buffer(name.replace(".", "_"), sd[name].clone())
    renamed = OrderedDict((k.replace(".", "_"), v) for k, v in sd.items())
    ref = hashlib.sha256()
    for name in sorted(renamed):
        t = renamed[name].contiguous()
        ref.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        ref.update(t.numpy().tobytes())
    assert state_dict_sha256(reordered) == ref.hexdigest()
    with torch.no_grad():
        b[4].weight[0, 0] += 1e-6
    assert state_dict_sha256(a) != state_dict_sha256(b)


def test_provenance_names_the_hash_and_counts_parameters(tmp_path):
    loaded = load_model("resnet18")
    prov = loaded.provenance()
    assert prov["sha256"] == state_dict_sha256(loaded.module) and prov["sha256_of"] == "state_dict tensors"
    assert prov["parameters"] == sum(p.numel() for p in loaded.module.parameters()) == 11_689_512
    path = tmp_path / "w.pt"
    torch.save(loaded.module.state_dict(), path)
    with_file = load_model("resnet18", str(path)).provenance()
    assert with_file["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert with_file["sha256_of"] == "weights file"


def test_cache_key_weights_digest_is_the_page_one_digest():
    """The activation cache keys the weights with the same canonical digest page 1 shows, so an audit
    hashes the weights once (the pipeline passes it to provenance)."""
    import torch

    from auditor.collect import state_hash

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert state_hash(m) == state_dict_sha256(m)
    loaded = load_model("resnet18")
    given = state_hash(loaded.module)
    assert loaded.provenance(state_sha256=given)["sha256"] == given == loaded.provenance()["sha256"]
