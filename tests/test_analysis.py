"""delta_cosine: every number against the dense d_out x d_in computation in float64."""
import math

import pytest
import torch

from lorafuse.adapters import LoraAdapter
from lorafuse.analysis import delta_cosine, lowrank_inner, subspace_cosines

SHAPES = {"l0.q": (23, 17), "l0.v": (9, 31), "l1.q": (23, 17)}


def _random_adapter(name, ranks, scale_range=(0.2, 2.0)):
    layers = {}
    for key, r in ranks.items():
        d_out, d_in = SHAPES[key]
        s = float(torch.empty(()).uniform_(*scale_range))
        layers[key] = (torch.randn(r, d_in), torch.randn(d_out, r), s)
    return LoraAdapter(name, layers)


def _dense(ad, key):
    a, b, s = ad.layers[key]
    return s * b.double() @ a.double()


def _dense_orth(m, rtol=1e-9):
    u, sv, _ = torch.linalg.svd(m, full_matrices=False)
    return u[:, sv > rtol * sv[0]]


def _dense_overlap(m1, m2):
    c = torch.linalg.svdvals(_dense_orth(m1).t() @ _dense_orth(m2))
    return (c.clamp(max=1) ** 2).mean().item()


def _cos(x, y):
    return (x.flatten() @ y.flatten() / (x.norm() * y.norm())).item()


def test_lowrank_inner_matches_dense(seeded):
    a1, b1 = torch.randn(3, 40), torch.randn(25, 3)
    a2, b2 = torch.randn(5, 40), torch.randn(25, 5)
    dense = ((b1.double() @ a1.double()) * (b2.double() @ a2.double())).sum()
    assert torch.allclose(lowrank_inner(a1, b1, a2, b2), dense, rtol=1e-10)


def test_against_dense(seeded):
    ads = [
        _random_adapter("x", {"l0.q": 3, "l0.v": 2, "l1.q": 4}),
        _random_adapter("y", {"l0.q": 5, "l1.q": 1}),       # does not target l0.v
        _random_adapter("z", {"l0.q": 2, "l0.v": 6, "l1.q": 3}),
    ]
    res = delta_cosine(ads)
    assert res.names == ["x", "y", "z"] and res.modules == ["l0.q", "l0.v", "l1.q"]
    flat = []
    for ad in ads:
        flat.append(torch.cat([_dense(ad, k).flatten() if k in ad.layers else torch.zeros(SHAPES[k]).double().flatten()
                               for k in res.modules]))
    for key in res.modules:
        for i, ai in enumerate(ads):
            want_norm = _dense(ai, key).norm().item() if key in ai.layers else 0.0
            assert res.norms[key][i].item() == pytest.approx(want_norm, rel=1e-9)
            for j, aj in enumerate(ads):
                if key in ai.layers and key in aj.layers:
                    di, dj = _dense(ai, key), _dense(aj, key)
                    assert res.cosine[key][i, j].item() == pytest.approx(_cos(di, dj), rel=1e-9, abs=1e-12)
                    assert res.column_overlap[key][i, j].item() == pytest.approx(_dense_overlap(di, dj), abs=1e-9)
                    assert res.row_overlap[key][i, j].item() == pytest.approx(_dense_overlap(di.t(), dj.t()),
                                                                             abs=1e-9)
                else:
                    assert math.isnan(res.cosine[key][i, j].item())
                    assert math.isnan(res.column_overlap[key][i, j].item())
    for i in range(3):
        assert res.overall_norm[i].item() == pytest.approx(flat[i].norm().item(), rel=1e-9)
        for j in range(3):
            assert res.overall_cosine[i, j].item() == pytest.approx(_cos(flat[i], flat[j]), rel=1e-9, abs=1e-12)
            both = [k for k in res.modules if k in ads[i].layers and k in ads[j].layers]
            rms = math.sqrt(sum(_cos(_dense(ads[i], k), _dense(ads[j], k)) ** 2 for k in both) / len(both))
            assert res.rms_cosine[i, j].item() == pytest.approx(rms, rel=1e-9)
            mean_col = sum(_dense_overlap(_dense(ads[i], k), _dense(ads[j], k)) for k in both) / len(both)
            assert res.mean_column_overlap[i, j].item() == pytest.approx(mean_col, abs=1e-9)
    assert "x / y" in res.summary()


def test_extremes_and_rank_deficient(seeded):
    x = _random_adapter("x", {"l0.q": 3})
    a, b, s = x.layers["l0.q"]
    neg = LoraAdapter("neg", {"l0.q": (a, -b, 2 * s)})
    # disjoint coordinates: orthogonal deltas, orthogonal column and row spaces
    a1, b1 = torch.zeros(2, 17), torch.zeros(23, 2)
    a1[:, :5], b1[:10] = torch.randn(2, 5), torch.randn(10, 2)
    a2, b2 = torch.zeros(2, 17), torch.zeros(23, 2)
    a2[:, 5:], b2[10:] = torch.randn(2, 12), torch.randn(13, 2)
    # rank-deficient A (repeated row): col(B A) is 2-dimensional while col(B) is 3-dimensional
    a_def = torch.cat([a[:2], a[:1]], 0)
    res = delta_cosine([x, neg, LoraAdapter("p", {"l0.q": (a1, b1, 1.0)}), LoraAdapter("q", {"l0.q": (a2, b2, 1.0)}),
                        LoraAdapter("d", {"l0.q": (a_def, b, 1.0)})])
    c = res.cosine["l0.q"]
    assert c[0, 0].item() == pytest.approx(1.0) and c[0, 1].item() == pytest.approx(-1.0)
    assert res.column_overlap["l0.q"][0, 1].item() == pytest.approx(1.0)
    assert abs(c[2, 3].item()) < 1e-12 and res.column_overlap["l0.q"][2, 3].item() < 1e-20
    assert res.row_overlap["l0.q"][2, 3].item() < 1e-20
    dense_d = b.double() @ a_def.double()
    assert res.column_overlap["l0.q"][0, 4].item() == pytest.approx(
        _dense_overlap(_dense(x, "l0.q"), dense_d), abs=1e-9)
    assert res.column_overlap["l0.q"][0, 4].item() == pytest.approx(1.0)  # col(B A_def) lies inside col(B)
    assert subspace_cosines(b, b.double() @ a_def[:, :3].double()).numel() == 2


def test_overlaps_of_a_full_rank_merge_equal_the_original(seeded):
    """merge_adapters(rank="full") writes a rank-2 delta as float32 factors of rank 17 (B = U S with
    S's tail at rounding level): the subspace overlaps are those of the original adapter, not 1."""
    import lorafuse

    x = _random_adapter("x", {"l0.q": 2})
    y = _random_adapter("y", {"l0.q": 3})
    x_full = lorafuse.merge_adapters([x], method="task_arithmetic", rank="full")
    assert x_full.layers["l0.q"][0].shape[0] > 2
    r, r_full = delta_cosine([x, y]), delta_cosine([x_full, y])
    for field in ("cosine", "column_overlap", "row_overlap"):
        want, got = getattr(r, field)["l0.q"][0, 1], getattr(r_full, field)["l0.q"][0, 1]
        assert abs(got - want) < 1e-5 and want < 0.9, field


def test_weak_stored_directions_count(seeded):
    """A steep but exactly stored spectrum (singular values 1 .. 1e-4 at d = 4096) keeps its weak
    directions in the overlaps: only rounding-level ones are dropped."""
    d, r = 4096, 8
    q = torch.linalg.qr(torch.randn(d, 2 * r, dtype=torch.float64))[0]
    sv = torch.logspace(0, -4, r, dtype=torch.float64)
    bx = (q[:, :r] * sv).float()
    by = torch.cat([q[:, r // 2:r], q[:, r:r + r // 2]], 1).float()  # x's four weakest directions + four new
    cos = subspace_cosines(bx, by)
    assert (cos > 0.99).sum() == r // 2 and cos.numel() == r


def test_from_peft_dirs_matches_peft_delta(tmp_path, seeded):
    from test_compose import peft_with_adapters, save_adapters

    _, peft_model, names = peft_with_adapters("llama")
    dirs = save_adapters(peft_model, names, tmp_path)
    res = delta_cosine(dirs)
    assert res.names == names
    key = "model.layers.0.self_attn.q_proj"  # a0 and a1
    layer = peft_model.base_model.model.get_submodule(key)
    d0, d1 = (layer.get_delta_weight(n).double() for n in names[:2])
    assert res.cosine[key][0, 1].item() == pytest.approx(_cos(d0, d1), rel=1e-6, abs=1e-9)
    assert res.norms[key][1].item() == pytest.approx(d1.norm().item(), rel=1e-6)


def test_bad_input():
    x = _random_adapter("x", {"l0.q": 3})
    y = LoraAdapter("y", {"l0.q": (torch.randn(2, 5), torch.randn(4, 2), 1.0)})
    with pytest.raises(ValueError, match="l0.q.*disagree on its shape"):
        delta_cosine([x, y])
    with pytest.raises(ValueError, match="targeted by none"):
        delta_cosine([x], modules=["nope"])
    with pytest.raises(TypeError, match="modules must be a list of module paths"):
        delta_cosine([x], modules="l0.q")
    with pytest.raises(ValueError, match="modules is empty"):
        delta_cosine([x], modules=[])
    with pytest.raises(ValueError, match=r"\['l0.q'\] are listed more than once"):
        delta_cosine([x], modules=["l0.q", "l0.q"])
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        delta_cosine([x, "/nonexistent/missing-dir"])
