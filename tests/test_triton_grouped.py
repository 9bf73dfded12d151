"""``fusedadapter::fusion_triton_grouped`` (issue 16): several fusions' row groups in one launch pair.

Each group's rows must equal that group run alone through ``fusion_triton`` (the same tiles: bitwise
in the interpreter) and hold the docs/algorithm.md §4 oracle against ``fusion_torch`` in float64
(truth) with ``fusion_torch`` at the test dtype as the yardstick. Groups differ in R, N, widths,
activations, temperatures, the xd columns they read (ln_mode), and leave gaps of unwritten rows.
Without a GPU this runs through the Triton interpreter (conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch

from fusedadapter.ops import fusion_torch
from fusedadapter.testing import assert_oracle

fusion = pytest.importorskip("fusedadapter.kernels.fusion", reason="needs the `triton` package")
grouped = pytest.importorskip("fusedadapter.kernels.fusion_grouped", reason="needs the `triton` package")
if fusion.unsupported_reason("cpu") is not None and not torch.cuda.is_available():
    pytest.skip(fusion.unsupported_reason("cpu"), allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() and not fusion.INTERPRET else "cpu"
H = 24
# (adapter widths, activation codes, temperature, xd columns (first, width) in units of H)
FUSIONS = [([3, 5, 4], [1, 2, 1], 1.0, (0, 1)),
           ([2, 6], [3, 1], 2.5, (1, 1)),
           ([4, 4, 3, 2], [1, 1, 1, 1], 0.7, (0, 2)),
           ([7], [2], 1.3, (0, 1))]


def _fusion(g, widths, acts, dtype, kd, with_bias):
    segs = [0]
    for w in widths:
        segs.append(segs[-1] + w)
    r, n = segs[-1], len(widths)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(acc)

    return dict(w_down=rnd(r, kd, scale=kd ** -0.5), b_down=rnd(r, scale=0.5) if with_bias else None,
                w_query=rnd(r + n, H, scale=0.5 * H ** -0.5), b_query=rnd(r + n, scale=0.5) if with_bias else None,
                w_out=rnd(H, r + n, scale=(r + n) ** -0.5), segments=segs, activations=acts)


def _case(dtype, counts, *, xq=True, residual=True, with_bias=True, fusions=FUSIONS, seed=0):
    """Inputs, the per-group fusions and the grouped op's packed arguments; groups in ``counts``
    order with a 2-row gap before each (rows no group writes)."""
    g = torch.Generator().manual_seed(seed)
    widest = max(f[3][0] + f[3][1] for f in fusions)
    fus = [_fusion(g, w, a, dtype, f_cols[1] * H, with_bias) for (w, a, _, f_cols) in fusions]
    m = sum(counts) + 2 * len(counts)
    xd = torch.randn(m, widest * H, generator=g, dtype=torch.float64).to(dtype)
    xq_t = torch.randn(m, H, generator=g, dtype=torch.float64).to(dtype) if xq else None
    res = torch.randn(m, H, generator=g, dtype=torch.float64).to(dtype) if residual else None
    kd_max = max(f[3][1] for f in fusions) * H
    acc = fus[0]["w_out"].dtype
    w_down = torch.zeros(sum(f["segments"][-1] for f in fus), kd_max, dtype=acc)
    groups, segs, acts, row, w_row, q_row, spans = [], [], [], 0, 0, 0, []
    for f, c, (_, _, _, (col, width)) in zip(fus, counts, fusions):
        r, n = f["segments"][-1], len(f["activations"])
        row += 2
        w_down[w_row:w_row + r, :width * H] = f["w_down"]
        groups += [row, c, col * H, width * H, w_row, q_row, r, n]
        segs += f["segments"]
        acts += f["activations"]
        spans.append((row, c, col * H, width * H))
        row, w_row, q_row = row + c, w_row + r, q_row + r + n
    cat = (lambda key: torch.cat([f[key] for f in fus]) if with_bias or key.startswith("w") else None)
    packed = (w_down, cat("b_down"), cat("w_query"), cat("b_query"), torch.cat([f["w_out"] for f in fus], 1))
    temps = [f[2] for f in fusions]
    return dict(xd=xd, xq=xq_t, res=res, fus=fus, packed=packed, groups=groups, segs=segs, acts=acts, temps=temps,
                spans=spans)


def _to(t, device, dtype=None):
    return None if t is None else t.to(device=device, dtype=dtype or t.dtype)


def _grouped(c, device=DEVICE):
    w_down, b_down, w_query, b_query, w_out = (_to(t, device) for t in c["packed"])
    return grouped.GROUPED_OP(_to(c["xd"], device), _to(c["xq"], device), _to(c["res"], device), w_down, b_down,
                             w_query, b_query, w_out, c["groups"], c["segs"], c["acts"], c["temps"],
                             _to(c.get("mask"), device))


def _alone(c, i, op, dtype=None, device="cpu"):
    row, n, col, kd = c["spans"][i]
    f = c["fus"][i]
    acc = None if dtype is None else (torch.float64 if dtype == torch.float64 else torch.float32)
    xd = c["xd"][row:row + n, col:col + kd]
    xq = c["xq"][row:row + n] if c["xq"] is not None else None
    if xq is None and (col != 0 or kd != c["xd"].shape[1]):
        raise AssertionError("a case without xq reads all of xd")
    res = c["res"][row:row + n] if c["res"] is not None else None
    w = [_to(f[k], device, acc) for k in ("w_down", "b_down", "w_query", "b_query", "w_out")]
    mask = None if c.get("mask") is None else _to(c["mask"][row:row + n, :len(f["activations"])], device)
    return op(_to(xd, device, dtype), _to(xq, device, dtype), _to(res, device, dtype), *w, f["segments"],
              f["activations"], c["temps"][i], adapter_mask=mask)


def _check(c, dtype):
    out, probs = _grouped(c)
    out, probs = out.cpu(), probs.cpu()
    for i, (row, n, _, _) in enumerate(c["spans"]):
        nk = len(c["fus"][i]["activations"])
        o, p = out[row:row + n], probs[row:row + n, :nk]
        so, sp = (t.cpu() for t in _alone(c, i, fusion.fusion_triton, device=DEVICE))
        if fusion.INTERPRET:  # the same tiles in the same order as the group alone
            assert torch.equal(o, so) and torch.equal(p, sp), f"group {i}: not the group alone through fusion_triton"
        truth = _alone(c, i, fusion_torch, torch.float64)
        ref = _alone(c, i, fusion_torch)
        assert_oracle(o, ref[0], truth[0], dtype, what=f"group {i} out")
        assert_oracle(p.to(ref[1].dtype), ref[1], truth[1], dtype, what=f"group {i} probs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("counts", [(7, 3, 40, 1), (1, 1, 1, 1), (33, 5, 2, 64)], ids=["uneven", "ones", "wide"])
def test_groups_equal_each_fusion_alone(dtype, counts):
    _check(_case(dtype, counts), dtype)


@pytest.mark.parametrize("what", ["no-xq", "no-residual", "no-bias"])
def test_optional_inputs(what):
    fusions = [(w, a, t, (0, 1)) for (w, a, t, _) in FUSIONS] if what == "no-xq" else FUSIONS
    c = _case(torch.float32, (5, 9, 2, 17), xq=what != "no-xq", residual=what != "no-residual",
              with_bias=what != "no-bias", fusions=fusions)
    _check(c, torch.float32)


@pytest.mark.skipif(fusion.INTERPRET or DEVICE != "cuda", reason="half precision needs a GPU (the interpreter's bf16 "
                    "arithmetic is wrong and the backend refuses it)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_a_gpu(dtype):
    _check(_case(dtype, (6, 3, 11, 200)), dtype)


def test_adapter_mask():
    # each row's group's adapters first; the first row of every group has all its adapters masked
    # (p = 0: the output is the residual), the columns past a group's N are ignored
    c = _case(torch.float32, (5, 9, 2, 17))
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(c["xd"].shape[0], 4, generator=g) > 0.35
    for row, *_ in c["spans"]:
        mask[row] = False
    c["mask"] = mask
    _check(c, torch.float32)
    out, probs = _grouped(c)
    for (row, *_), f in zip(c["spans"], c["fus"]):
        assert torch.equal(out[row].cpu(), c["res"][row]) and not probs[row, :len(f["activations"])].cpu().any()
    with pytest.raises(ValueError, match="adapter_mask must be a bool"):
        _grouped(dict(c, mask=mask[:, :3]))


def test_groups_may_come_in_any_order():
    c = _case(torch.float32, (4, 6, 3, 5))
    # the groups listed in reverse: the same rows and values
    rev = [v for gi in reversed(range(len(c["groups"]) // 8)) for v in c["groups"][gi * 8:(gi + 1) * 8]]
    n_of = [len(f["activations"]) for f in c["fus"]]
    bounds, codes, so, ao = [], [], 0, 0
    for n in n_of:
        bounds.append(c["segs"][so:so + n + 1])
        codes.append(c["acts"][ao:ao + n])
        so, ao = so + n + 1, ao + n
    c2 = dict(c, groups=rev, segs=[b for x in reversed(bounds) for b in x],
              acts=[a for x in reversed(codes) for a in x], temps=list(reversed(c["temps"])))
    out, probs = _grouped(c)
    out2, probs2 = _grouped(c2)
    for (row, n, _, _), nk in zip(c["spans"], n_of):  # (columns past a group's N are not written)
        assert torch.equal(out[row:row + n], out2[row:row + n])
        assert torch.equal(probs[row:row + n, :nk], probs2[row:row + n, :nk])


def _bad(c, **change):
    args = dict(xd=c["xd"], xq=c["xq"], res=c["res"], groups=c["groups"], segs=c["segs"], acts=c["acts"],
                temps=c["temps"])
    args.update(change)
    w_down, b_down, w_query, b_query, w_out = c["packed"]
    return grouped.GROUPED_OP(args["xd"], args["xq"], args["res"], w_down, b_down, w_query, b_query, w_out,
                             args["groups"], args["segs"], args["acts"], args["temps"])


@pytest.mark.skipif(DEVICE != "cpu", reason="bad input checked once, on the interpreter's CPU tensors")
def test_bad_input_names_what_was_expected():
    c = _case(torch.float32, (3, 4, 5, 6))
    g = list(c["groups"])
    with pytest.raises(ValueError, match="8 ints per row group"):
        _bad(c, groups=g[:-1])
    with pytest.raises(ValueError, match="one temperature per row group"):
        _bad(c, temps=c["temps"][:-1])
    overlap = list(g)
    overlap[8] = g[0]  # group 1 starts on group 0's rows
    with pytest.raises(ValueError, match="disjoint"):
        _bad(c, groups=overlap)
    past = list(g)
    past[1] = 10_000
    with pytest.raises(ValueError, match="inside the"):
        _bad(c, groups=past)
    wide = list(g)
    wide[30] = 10_000  # the last group's R past the packed w_down
    with pytest.raises(ValueError, match="outside the packed weights"):
        _bad(c, groups=wide)
    with pytest.raises(ValueError, match="every temperature must be > 0"):
        _bad(c, temps=[1.0, 0.0, 1.0, 1.0])
    shared_rows = list(g)
    shared_rows[12] = g[4]  # group 1's w_down rows start on group 0's
    with pytest.raises(ValueError, match="w_down rows .* must be disjoint"):
        _bad(c, groups=shared_rows)
    shared_q = list(g)
    shared_q[13] = g[5]  # group 1's w_query rows start on group 0's (its weight gradients would overwrite)
    with pytest.raises(ValueError, match="w_query rows .* must be disjoint"):
        _bad(c, groups=shared_q)
    with pytest.raises(ValueError, match="each group's N codes"):
        _bad(c, acts=c["acts"][:-1])
    segs = list(c["segs"])
    segs[1] = 99
    with pytest.raises(ValueError, match="must rise from 0"):
        _bad(c, segs=segs)
    shared = _case(torch.float32, (3, 4, 5, 6), xq=False, fusions=[(w, a, t, (0, 1)) for (w, a, t, _) in FUSIONS])
    narrow = list(shared["groups"])
    narrow[3] = H - 4  # group 0 reads part of xd, but without xq the query half reads all of it
    with pytest.raises(ValueError, match="reads all of xd"):
        _bad(shared, groups=narrow)
    with pytest.raises(TypeError, match="weights must be torch.float64 for torch.float64 activations"):
        _bad(c, xd=c["xd"].double(), xq=c["xq"].double(), res=c["res"].double())
    w_down, b_down, w_query, b_query, w_out = c["packed"]
    with pytest.raises(ValueError, match=r"fusion_triton_grouped: residual is on meta, expected cpu \(the device of xd\)"):
        grouped.check_grouped_args(c["xd"], c["xq"], c["res"].to("meta"), w_down, b_down, w_query, b_query, w_out,
                                  c["groups"], c["segs"], c["acts"], c["temps"])


def test_opcheck_schema_and_fake():
    c = _case(torch.float32, (3, 2, 4, 1))
    w_down, b_down, w_query, b_query, w_out = c["packed"]
    args = (c["xd"], c["xq"], c["res"], w_down, b_down, w_query, b_query, w_out, c["groups"], c["segs"], c["acts"],
            c["temps"])
    torch.library.opcheck(grouped.GROUPED_OP, [_to(a, DEVICE) if isinstance(a, torch.Tensor) else a for a in args],
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# --------------------------------------------------------------------------- backward
def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _grouped_grads(c, dropout_p, seeds, keep, shift, cot):
    """The grouped op's output, probabilities and the gradients of every input (on the CPU) for the
    loss sum over groups of <out[t], cot_out[t]> + <probs[t, :N], cot_p[t, :N]>."""
    ins = {k: _leaf(_to(c[k], DEVICE)) for k in ("xd", "xq", "res")}
    packed = [_leaf(_to(t, DEVICE)) for t in c["packed"]]
    sh = _leaf(_to(shift, DEVICE))
    out, probs = grouped.GROUPED_OP(ins["xd"], ins["xq"], ins["res"], *packed, c["groups"], c["segs"], c["acts"],
                                    c["temps"], _to(c.get("mask"), DEVICE), dropout_p, seeds, _to(keep, DEVICE), sh)
    loss = 0
    for (row, n, _, _), f in zip(c["spans"], c["fus"]):
        nk = len(f["activations"])
        loss = loss + (out[row:row + n] * _to(cot[0][row:row + n], DEVICE)).sum()
        loss = loss + (probs[row:row + n, :nk] * _to(cot[1][row:row + n, :nk], DEVICE)).sum()
    loss.backward()
    named = dict(ins, w_down=packed[0], b_down=packed[1], w_query=packed[2], b_query=packed[3], w_out=packed[4],
                 shift=sh)
    return out.detach().cpu(), probs.detach().cpu(), {k: None if v is None else v.grad.cpu() for k, v in named.items()}


def _alone_grads(c, i, op, dtype, device, dropout_p, seeds, keep, shift, cot):
    """Group i alone through ``op`` (with autograd): its output, probs and input gradients."""
    row, n, col, kd = c["spans"][i]
    f = c["fus"][i]
    nk = len(f["activations"])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    xd = _leaf(_to(c["xd"][row:row + n, col:col + kd], device, dtype))
    xq = _leaf(_to(c["xq"][row:row + n], device, dtype)) if c["xq"] is not None else None
    res = _leaf(_to(c["res"][row:row + n], device, dtype)) if c["res"] is not None else None
    w = {k: _leaf(_to(f[k], device, acc)) for k in ("w_down", "b_down", "w_query", "b_query", "w_out")}
    sh = _leaf(_to(shift[row:row + n], device, acc)) if shift is not None else None
    km = _to(keep[row:row + n, :nk], device) if keep is not None else None
    mask = None if c.get("mask") is None else _to(c["mask"][row:row + n, :nk], device)
    out, probs = op(xd, xq, res, w["w_down"], w["b_down"], w["w_query"], w["b_query"], w["w_out"], f["segments"],
                    f["activations"], c["temps"][i], dropout_p, seeds[i] if seeds else 0, km, sh, mask)
    loss = (out * _to(cot[0][row:row + n], device, dtype)).sum() + (probs * _to(cot[1][row:row + n, :nk], device,
                                                                             acc)).sum()
    loss.backward()
    named = dict(xd=xd, xq=xq, res=res, shift=sh, **w)
    return out.detach().cpu(), probs.detach().cpu(), {k: None if v is None else v.grad.cpu() for k, v in named.items()}


def _slice(grads, c, i):
    """Group i's part of the grouped op's gradients, keyed as _alone_grads'."""
    row, n, col, kd = c["spans"][i]
    g = c["groups"][i * 8:(i + 1) * 8]
    w_row, q_row, r, nk = g[4], g[5], g[6], g[7]
    take = dict(xd=lambda t: t[row:row + n, col:col + kd], xq=lambda t: t[row:row + n], res=lambda t: t[row:row + n],
                shift=lambda t: t[row:row + n], w_down=lambda t: t[w_row:w_row + r, :kd],
                b_down=lambda t: t[w_row:w_row + r], w_query=lambda t: t[q_row:q_row + r + nk],
                b_query=lambda t: t[q_row:q_row + r + nk], w_out=lambda t: t[:, q_row:q_row + r + nk])
    return {k: None if grads[k] is None else take[k](grads[k]) for k in take}


def _check_backward(c, dtype, dropout_p=0.0, seeds=(), keep=None, shift=None):
    g = torch.Generator().manual_seed(11)
    m = c["xd"].shape[0]
    n_max = max(len(f["activations"]) for f in c["fus"])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cot = (torch.randn(m, H, generator=g, dtype=torch.float64).to(dtype),
           torch.randn(m, n_max, generator=g, dtype=torch.float64).to(acc))
    out, probs, grads = _grouped_grads(c, dropout_p, seeds, keep, shift, cot)
    args = (dropout_p, seeds, keep, shift, cot)
    for i, (row, n, col, kd) in enumerate(c["spans"]):
        nk = len(c["fus"][i]["activations"])
        mine = _slice(grads, c, i)
        so, sp, sg = _alone_grads(c, i, fusion._OP, dtype, DEVICE, *args)
        if fusion.INTERPRET:  # the forward: the same tiles and dropout draw as the group alone
            assert torch.equal(out[row:row + n], so) and torch.equal(probs[row:row + n, :nk], sp), f"group {i}"
        _, _, truth = _alone_grads(c, i, fusion_torch, torch.float64, "cpu", *args)
        _, _, ref = _alone_grads(c, i, fusion_torch, dtype, "cpu", *args)
        for k, t in truth.items():
            if t is None:
                assert mine[k] is None, f"group {i}: {k} has a gradient it should not"
                continue
            assert mine[k] is not None, f"group {i}: no gradient for {k}"
            assert_oracle(mine[k].to(ref[k].dtype), ref[k], t, dtype, what=f"group {i} d{k}")
            torch.testing.assert_close(mine[k], sg[k], rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                       atol=1e-5 if dtype == torch.float32 else 1e-12, msg=f"group {i} d{k} vs alone")
    # what no group reads gets 0: the rows between the groups, w_down's padding columns
    covered = torch.zeros(m, dtype=torch.bool)
    for row, n, _, _ in c["spans"]:
        covered[row:row + n] = True
    for k in ("xd", "xq", "res", "shift"):
        if grads[k] is not None:
            assert not grads[k][~covered].any(), f"d{k} on rows no group reads"
    for i, (_, _, _, kd) in enumerate(c["spans"]):
        w_row, r = c["groups"][i * 8 + 4], c["groups"][i * 8 + 6]
        assert not grads["w_down"][w_row:w_row + r, kd:].any(), "d w_down on padding columns"
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("counts", [(7, 3, 40, 1), (1, 1, 1, 1), (33, 5, 2, 300)], ids=["uneven", "ones", "split-k"])
def test_backward_equals_each_group_alone(dtype, counts):
    _check_backward(_case(dtype, counts), dtype)


@pytest.mark.parametrize("what", ["no-xq", "no-residual", "no-bias", "mask"])
def test_backward_optional_inputs(what):
    fusions = [(w, a, t, (0, 1)) for (w, a, t, _) in FUSIONS] if what == "no-xq" else FUSIONS
    c = _case(torch.float32, (5, 9, 2, 17), xq=what != "no-xq", residual=what != "no-residual",
              with_bias=what != "no-bias", fusions=fusions)
    if what == "mask":
        mask = torch.rand(c["xd"].shape[0], 4, generator=torch.Generator().manual_seed(5)) > 0.35
        mask[c["spans"][1][0]] = False  # a row with every adapter masked
        c["mask"] = mask
    _check_backward(c, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("draw", ["hash", "keep-mask"])
def test_backward_with_dropout(dtype, draw):
    """Logit dropout with the key-bias shift: a hash draw per group (its own seed, its own rows
    from 0: what the group alone draws) or an explicit keep mask; d shift included."""
    c = _case(dtype, (6, 11, 3, 9), seed=3)
    m = c["xd"].shape[0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(4)
    shift = torch.randn(m, generator=g, dtype=torch.float64).to(acc)
    if draw == "hash":
        _check_backward(c, dtype, 0.3, [17, 5, 123456789, 2**31 + 7], None, shift)
    else:
        keep = torch.rand(m, 4, generator=g) > 0.3
        for row, *_ in c["spans"]:  # a drop in every group (d shift is exactly 0 on rows that keep all)
            keep[row, 0] = False
        _check_backward(c, dtype, 0.3, (), keep, shift)


def test_backward_split_k_path(monkeypatch):
    """The weight-gradient GEMMs split a group's rows across programs when they are many; the
    quantum lowered so that small groups split too (and a split past a small group's rows idles)."""
    monkeypatch.setattr(fusion, "SPLIT_K_QUANTUM", 4)
    _check_backward(_case(torch.float32, (3, 21, 9, 2)), torch.float32)


def test_backward_gradients_only_where_asked():
    c = _case(torch.float32, (3, 2, 4, 1))
    xd = c["xd"].clone().requires_grad_(True)
    w_down, b_down, w_query, b_query, w_out = c["packed"]
    w_out = w_out.clone().requires_grad_(True)
    out, _ = grouped.GROUPED_OP(xd, c["xq"], c["res"], w_down, b_down, w_query, b_query, w_out, c["groups"],
                                c["segs"], c["acts"], c["temps"])
    out.sum().backward()
    assert xd.grad is not None and w_out.grad is not None and torch.isfinite(xd.grad).all()
    with pytest.raises(ValueError, match="one seed per row group"):
        grouped.GROUPED_OP(c["xd"], c["xq"], c["res"], *c["packed"], c["groups"], c["segs"], c["acts"], c["temps"],
                           None, 0.2, [1, 2])
    with pytest.raises(ValueError, match="keep_mask must be a bool"):
        grouped.GROUPED_OP(c["xd"], c["xq"], c["res"], *c["packed"], c["groups"], c["segs"], c["acts"], c["temps"],
                           None, 0.2, [], torch.ones(c["xd"].shape[0], 3, dtype=torch.bool))
