"""The launch-config tables (host-side logic, no kernels run) and the settings read at import."""
import importlib
import os
import subprocess
import sys

import pytest

lg = importlib.import_module("lorafuse.kernels.lora_gemm")


def _ceil(a, b):
    return -(-a // b)


@pytest.mark.parametrize("sms", [132, 114, 78])
@pytest.mark.parametrize("T", [1, 16, 17, 33, 64])
@pytest.mark.parametrize("N", [1000, 4096, 14336, 28672])
def test_decode_config_keeps_one_wave(T, N, sms, monkeypatch):
    # The table is what runs on a GPU; under the interpreter gemm_config returns a fixed small config.
    monkeypatch.setattr(lg, "is_interpreting", lambda: False)
    cfg = lg.gemm_config(T, N, 4096, fused=True, R=48, sms=sms)
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    assert bm >= min(T, 64) and bm <= max(16, 2 * T), "one row block for T <= 64, not more rows than needed"
    programs = _ceil(T, bm) * _ceil(N, bn)
    if _ceil(T, bm) * _ceil(N, 128) <= sms:
        assert programs <= sms, f"{programs} programs on {sms} SMs: a second, partial wave"
        narrower = bn // 2
        if narrower >= 32:
            assert _ceil(T, bm) * _ceil(N, narrower) > sms, "the narrowest block that fits one wave"
    else:
        assert bn == 128
    # The shrink's a_cat tile (R = 48 -> 64 columns) is in the main loop unless the shrink is shared;
    # shared, its work items' loop (x and a_cat tiles) is pipelined as deep as the main loop. With
    # either choice forced, and at ranks up to the on-chip limit, both loops fit.
    bk = cfg.kwargs["BLOCK_K"]
    for R in (48, 128, 256):
        br = lg.block_for(R)
        for forced in (None, False, True):
            c = lg.gemm_config(T, N, 4096, fused=True, R=R, sms=sms, shared=forced)
            shared = lg.decode_shares_shrink(T, _ceil(N, bn), 4096, N) if forced is None else forced
            loops = [bm * bk + bk * bn + (0 if shared else bk * br)] + ([bm * bk + bk * br] if shared else [])
            assert c.num_stages * max(loops) * 2 <= 200 * 1024 and c.num_stages <= 6, (R, forced, c)


def _import_with(value):
    env = dict(os.environ, LORAFUSE_MAP_PRECISION=value)
    code = "import importlib; print(importlib.import_module('lorafuse.kernels.lora_gemm').MAP_PRECISION)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_map_precision_setting():
    assert lg.MAP_PRECISION in ("tf32x3", "ieee")
    bad = _import_with("tf32")
    assert bad.returncode != 0 and "LORAFUSE_MAP_PRECISION must be 'ieee' or 'tf32x3'" in bad.stderr
    ok = _import_with("ieee")
    assert ok.returncode == 0 and ok.stdout.strip().endswith("ieee"), ok.stderr


@pytest.mark.parametrize("T", [16, 512, 2048, 8192, 16384])
@pytest.mark.parametrize("cols", [3, 68, 130, 272, 1088, 4352])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float32"])
def test_stacked_routed_config_fits_shared_memory(T, cols, dtype_name, monkeypatch):
    """The routed shrink's one-operand launch shapes keep their pipelined tiles within the 200 KiB
    the other tables budget (Hopper has 227 KiB per block), in every dtype."""
    import torch

    rk = importlib.import_module("lorafuse.kernels.routing")
    sh = importlib.import_module("lorafuse.kernels.shrink")
    monkeypatch.setattr(rk, "is_interpreting", lambda: False)
    monkeypatch.setattr(sh, "is_interpreting", lambda: False)
    dtype = getattr(torch, dtype_name)
    cfg = rk.stacked_config(T, 4096, cols, dtype, torch.device("cpu"))
    esize = torch.empty(0, dtype=dtype).element_size()
    per_stage = (cfg["BLOCK_T"] * cfg["BLOCK_K"] + cfg["BLOCK_K"] * cfg["BLOCK_R"]) * esize
    assert per_stage * cfg["num_stages"] <= 200 * 1024, cfg


@pytest.mark.parametrize("T", [2048, 4096, 8192, 16384, 65536])
@pytest.mark.parametrize("R", [1, 24, 48, 64, 65, 128])
@pytest.mark.parametrize("d_in", [512, 4096, 14336])
@pytest.mark.parametrize("sms", [132, 114])
def test_tma_shrink_config_fits_and_splits(T, R, d_in, sms):
    """The copy-engine shrink's table: its pipelined x and a_cat tiles fit the shared memory it
    budgets, and a K split keeps at least four column steps (the pipeline's depth to fill)."""
    sh = importlib.import_module("lorafuse.kernels.shrink")
    cfg = sh.tma_shrink_config(T, d_in, R, sms)
    assert cfg["BLOCK_R"] >= R
    per_stage = (cfg["BLOCK_T"] + cfg["BLOCK_R"]) * cfg["BLOCK_K"] * 2
    assert 2 <= cfg["num_stages"] and per_stage * cfg["num_stages"] <= sh.TMA_SMEM, cfg
    assert cfg["SPLITS"] >= 1
    if cfg["SPLITS"] > 1:
        assert d_in // cfg["SPLITS"] >= 4 * cfg["BLOCK_K"], cfg
    # About one program per SM where d_in allows the splits.
    programs = cfg["SPLITS"] * _ceil(T, cfg["BLOCK_T"])
    assert programs <= 2 * sms or cfg["SPLITS"] == 1, cfg
