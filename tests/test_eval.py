"""tq_ops.eval: the evaluation CLI end to end on a tiny random model, and its parts (row specs,
effective bits, the vLLM and KIVI baseline formats, passkey prompts, chunk schedules).

The SmolLM2 run (the README's main command on its embedded default) is marked slow."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from tq_ops.eval import allocation, baselines, cli, metrics  # noqa: E402
from tq_ops.eval.assets import ByteTokenizer, tiny_model  # noqa: E402
from tq_ops.eval.rows import Mix, Row, edges_order, parse_row  # noqa: E402
from tq_ops.hf_cache import register  # noqa: E402


# -- effective bits, by hand from each format's stored bytes -----------------------------------

@pytest.mark.parametrize("d,name,slot", [
    # vLLM's TurboQuantConfig: ceil(D*kb/8) + 2 (norm) + ceil(D*vb/8) + 4 (scale, zero), even
    (128, "4bit_nc", 64 + 2 + 64 + 4), (128, "k3v4_nc", 48 + 2 + 64 + 4),
    (128, "3bit_nc", 48 + 2 + 48 + 4), (64, "4bit_nc", 32 + 2 + 32 + 4),
    (64, "k3v4_nc", 24 + 2 + 32 + 4), (64, "3bit_nc", 24 + 2 + 24 + 4)])
def test_vllm_slot_bytes(d, name, slot):
    assert baselines.vllm_slot_bytes(d, *baselines.VLLM_PRESETS[name]) == slot
    assert parse_row(f"vllm-{name}", 0, 0, 0).bits_per_channel(d, 1) == slot * 8 / (2 * d)


def test_bits_per_channel_counts_boundary_layers_at_16_bits():
    # k3v3 at D=64: keys 24 + 2, values 24 + 2 bytes = 52 B = 3.25 bits/channel
    row = parse_row("k3v3:b2", 4, 128, 0)
    assert row.bits_per_channel(64, 30) == pytest.approx((4 * 16 + 26 * 3.25) / 30)
    # seed at D=64: 16 codes + 8 signs + 2 norm + 2 gamma, values 24 + 2 = 54 B
    assert parse_row("seed", 4, 128, 0).bits_per_channel(64, 30) == 54 * 8 / 128
    # KIVI-2 at D=64: 16 + 16 code bytes, keys 64 ch x 4 B / 32 tokens, values 2 groups x 4 B
    assert parse_row("kivi2", 0, 128, 0).bits_per_channel(64, 1) == (32 + 8 + 8) * 8 / 128


def test_row_specs():
    row = parse_row("k3q1v2:s2:w64:b1", 4, 128, 0)
    assert row == Row("k3q1v2", 2, 64, 1)
    assert row.tq_config(64).key_qjl_bits == 1 and row.tq_config(64).value_bits == 2
    assert parse_row("baseline", 4, 128, 2) == Row("baseline", 0, 0, 0)
    for bad in ("k5v3", "vllm-2bit", "kivi2:w0", "k3v3:x1", "kivi2:w100"):
        with pytest.raises(ValueError):
            parse_row(bad, 4, 128, 0)


# -- layer mixes -------------------------------------------------------------------------------

def test_mix_row_specs():
    row = parse_row("k4v3+k3v3@3.5/edges:s2:w64", 4, 128, 0)
    assert row == Row("k4v3+k3v3@3.5/edges", 2, 64, 0)
    assert row.mix == Mix("k4v3", "k3v3", 3.5, "edges")
    assert parse_row("k4v4+k4v3@4", 4, 128, 0).mix == Mix("k4v4", "k4v3", 4.0, "calib")
    assert parse_row("k3q1v3+seed@3.6/calib", 4, 128, 0).mix.rule == "calib"
    assert parse_row("k4v3", 4, 128, 0).mix is None


@pytest.mark.parametrize("spec,message", [
    ("k4v3+k3v3", "HIGH\\+LOW@BUDGET"), ("k4v3@3.5", "HIGH\\+LOW@BUDGET"),
    ("k4v3+k3v3@", "not a number"), ("k4v3+k3v3@abc", "not a number"),
    ("k4v3+k3v3@0", "budget must be"), ("k4v3+k3v3@17", "budget must be"),
    ("k4v3+k3v3@3.5/best", "unknown rule 'best'"), ("k4v3+k4v3@3.5", "same format"),
    ("k4v3+vllm-3bit_nc@3.5", "'vllm-3bit_nc' is not a TurboQuant format"),
    ("k4v3+k3v3nc@3.5", "'k3v3nc' is not a TurboQuant format"),
    ("k5v3+k3v3@3.5", "'k5v3' is not a TurboQuant format"),
    ("k4v3+k3v3+k2v2@3.5", "HIGH\\+LOW@BUDGET")])
def test_mix_row_errors_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_row(spec, 4, 128, 0)


def test_edges_order():
    assert edges_order(5) == (0, 4, 1, 3, 2)
    assert edges_order(4) == (0, 3, 1, 2)
    assert edges_order(1) == (0,)


def test_mix_bits_and_layers_by_hand():
    # D=64, 30 layers: k4v3 3.75 bits/ch, k3v3 3.25; each upgraded layer adds 0.5 / 30
    row = parse_row("k4v3+k3v3@3.6/edges", 4, 128, 0)
    plan = row.layer_plan(64, 30)
    assert row.bits_per_channel(64, 30) == pytest.approx((21 * 3.75 + 9 * 3.25) / 30) == 3.6
    assert plan.layers_with(row.part("k4v3").tq_config(64)) == [*range(11), *range(20, 30)]
    row = parse_row("k4v3+k3v3@3.5/edges", 4, 128, 0)
    assert row.layer_plan(64, 30).layers_with(row.part("k4v3").tq_config(64)) == [
        *range(8), *range(23, 30)]
    # exact boundary layers count at 16 bits against the budget: b1 leaves room for
    # (4.4 * 30 - 2 * 16 - 28 * 3.25) / 0.5 = 18 upgrades
    assert parse_row("k4v3+k3v3@4.4/edges:b1", 4, 128, 0).bits_per_channel(64, 30) == \
        pytest.approx((2 * 16 + 18 * 3.75 + 10 * 3.25) / 30)
    with pytest.raises(ValueError, match="below the low format"):
        parse_row("k4v3+k3v3@3.5/edges:b2", 4, 128, 0).bits_per_channel(64, 30)


def test_calibrated_mix_follows_its_measured_order():
    row = parse_row("k4v3+k3v3@3.5", 4, 128, 0)
    with pytest.raises(ValueError, match="needs its measured layer order"):
        row.bits_per_channel(64, 4)
    with pytest.raises(ValueError, match="only a calibrated"):
        parse_row("k4v3+k3v3@3.5/edges", 4, 128, 0).with_order([0, 1, 2, 3])
    with pytest.raises(ValueError, match="not a permutation"):
        row.with_order([0, 1, 1, 3]).layer_plan(64, 4)
    # 4 layers at 3.25, budget 3.5: room for 2 upgrades, the first two of the order
    plan = row.with_order([2, 0, 3, 1]).layer_plan(64, 4)
    assert plan.layers_with(row.part("k4v3").tq_config(64)) == [0, 2]
    # order: decreasing attention-error gain of HIGH over LOW, ties by index
    assert allocation.order_from_errors([0.25, 0.75, 0.625, 0.125],
                                      [0.125, 0.25, 0.125, 0.125]) == (1, 2, 0, 3)


@torch.inference_mode()
def test_calibration_measures_each_mix_once_on_the_given_text():
    model, _ = tiny_model(register(), torch.float32, "cpu")
    x = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(2))
    captured = metrics.capture_qkv(model, x)
    rows = [parse_row(s, 4, 64, 0) for s in
            ("k4v4+k3v3@3.5", "k4v4+k3v3@3.75", "k4v4+k3v3@3.5/edges", "k3v3")]
    out, cals = allocation.calibrate(rows, captured, model.config, 256)
    assert out[2:] == rows[2:]  # the fixed rule and the uniform row need no measurement
    assert out[0].order == out[1].order and set(cals) == {rows[0].label, rows[1].label}
    cal = cals[rows[0].label]
    # one more bit for keys and values lowers every layer's attention error (by ~2x at 3 -> 4 bits)
    assert all(h < lo for h, lo in zip(cal.high_err, cal.low_err))
    assert out[0].order == tuple(sorted(range(2), key=lambda i: -cal.gain[i]))


@torch.inference_mode()
def test_mix_rows_at_one_format_equal_that_format_bit_for_bit():
    """Through the eval's rows: a mix whose budget admits every layer (or none) makes the same
    cache as the uniform row, so the same logits bit for bit."""
    model, _ = tiny_model(register(), torch.float32, "cpu")
    x = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(3))
    for mix, one in [("k4v3+k3v3@3.75/edges", "k4v3"), ("k4v3+k3v3@3.25/edges", "k3v3")]:
        logits = []
        for spec in (mix, one):
            row = parse_row(spec, 4, 64, 0)
            cache, pos, outs = row.make_cache(model.config), 0, []
            for size in row.chunk_sizes(150, 256):
                outs.append(model(x[:, pos:pos + size], past_key_values=cache).logits)
                pos += size
            assert cache.layers[0].comp_key.shape[1] == 128
            logits.append(torch.cat(outs, 1))
        assert torch.equal(*logits)


def test_cli_runs_mixes_and_refuses_to_calibrate_on_the_test_text(tmp_path):
    text, calib = tmp_path / "text.txt", tmp_path / "calib.txt"
    text.write_text("Now is the winter of our discontent made glorious summer. " * 30)
    calib.write_text("To be, or not to be, that is the question: whether 'tis nobler. " * 30)
    common = ["--model", "tiny-random", "--text", str(text), "--ppl-length", "300",
              "--ppl-windows", "1", "--passkey-lengths", "", "--attn-length", "100",
              "--window", "64", "--threads", "1", "--calib-length", "200"]
    with pytest.raises(SystemExit, match="tune on the test set"):
        cli.main(common + ["--rows", "k4v4+k3v3@3.5", "--calib-text", str(text),
                           "--out", str(tmp_path / "bad")])
    out = tmp_path / "out"
    assert cli.main(common + ["--rows", "k4v4+k3v3@3.75,k4v4+k3v3@3.75/edges", "--calib-text",
                              str(calib), "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    rows = {r["row"]: r for r in data["rows"]}
    # 2 layers, k3v3 3.25 + k4v4 4.25 bits/ch: a 3.75 budget takes exactly one upgrade
    cal = rows["k4v4+k3v3@3.75:s4:w64:b0"]
    assert cal["bits_per_channel"] == 3.75 and len(cal["high_layers"]) == 1
    assert rows["k4v4+k3v3@3.75/edges:s4:w64:b0"]["high_layers"] == [0]
    assert data["meta"]["calibration"]["text"] == str(calib)
    assert cal["high_layers"] == data["meta"]["calibration"]["rows"][cal["row"]]["order"][:1]


def test_chunk_schedule_aligns_to_the_flush_boundary():
    assert Row("k3v3", 4, 128, 0).chunk_sizes(600, 256) == [132, 128, 128, 128, 84]
    assert Row("k3v3", 0, 0, 0).chunk_sizes(600, 256) == [256, 256, 88]
    assert Row("baseline", 0, 0, 0).chunk_sizes(100, 256) == [100]


# -- baseline formats --------------------------------------------------------------------------

def test_vllm_keys_keep_their_norm_and_values_stay_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    comp = baselines.VLLMCompressor("k3v4_nc", 64, "cpu")
    k = torch.randn(5, 7, 2, 64, generator=g) * 3
    v = torch.randn(5, 7, 2, 64, generator=g)
    kq, vq = comp.compress(k, v)
    # norm correction: the reconstruction has exactly the stored (fp16) norm
    norm16 = torch.linalg.vector_norm(k, dim=-1).half().float()
    assert torch.allclose(torch.linalg.vector_norm(kq, dim=-1), norm16, rtol=1e-5)
    # 3-bit keys: the cosine to the original is that of 3-bit Lloyd-Max (D_mse = 0.034: cos ~0.98)
    cos = torch.nn.functional.cosine_similarity(kq, k, dim=-1)
    assert cos.mean() > 0.97
    # uniform 4-bit values: error at most half a step (+ fp16 rounding of scale and zero)
    step = (v.amax(-1, keepdim=True) - v.amin(-1, keepdim=True)) / 15
    assert ((vq - v).abs() <= step / 2 + 1e-2 * step + 1e-3).all()


def test_key_norm_correction_experiment_restores_the_key_norm():
    """k3v3nc: same records as k3v3 except the key norm field, so the decoded key has the input's
    norm (to fp16 rounding) where plain Lloyd-Max reconstruction is shorter by ~sqrt(1 - D_mse)."""
    from tq_ops import reference
    from tq_ops import codebooks
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(500, 3, 64, generator=g) * 4, torch.randn(500, 3, 64, generator=g)
    nc = parse_row("k3v3nc", 0, 128, 0).compressor_factory(64)("cpu")
    kr_nc, vr_nc = nc.compress(k, v)
    kr, vr = nc.__class__.__mro__[1].compress(nc, k, v)  # the plain TQCompressor encoding
    c = nc.codec
    dec = lambda r: reference.decode_keys(r, c.rotation, c.qjl_projection, c.key_centroids, 3,  # noqa: E731
                                          False)
    norm = torch.linalg.vector_norm(k, dim=-1)
    assert torch.allclose(torch.linalg.vector_norm(dec(kr_nc), dim=-1), norm, rtol=2e-3)
    # plain Lloyd-Max: E ||c||^2 = 1 - D_mse (3 bits, D=64: 0.966); the mean over 1500 vectors has
    # a standard error ~5e-4, the bound is 20x that
    shrink = (torch.linalg.vector_norm(dec(kr), dim=-1) / norm).square().mean()
    assert abs(float(shrink) - (1 - codebooks.expected_mse(64, 3))) < 0.01
    assert torch.equal(kr_nc[..., :24], kr[..., :24]) and torch.equal(vr_nc, vr)


def test_kivi_needs_whole_token_groups():
    comp = baselines.KIVICompressor(2, 64, "cpu")
    with pytest.raises(ValueError, match="groups of 32"):
        comp.compress(torch.zeros(1, 20, 2, 64), torch.zeros(1, 20, 2, 64))
    k = torch.randn(1, 64, 2, 64, generator=torch.Generator().manual_seed(1))
    kq, _ = comp.compress(k, k)
    # per channel over 32 tokens, 2 bits: at most half of (max - min) / 3 away
    blocks = k.reshape(1, 2, 32, 2, 64)
    step = (blocks.amax(2) - blocks.amin(2)) / 3
    err = (kq - k).abs().reshape(1, 2, 32, 2, 64).amax(2)
    assert (err <= step / 2 + 1e-2 * step + 1e-3).all()


# -- passkey prompts ---------------------------------------------------------------------------

def test_passkey_prompts_have_the_requested_length_and_needle():
    tok = ByteTokenizer()
    prompts = metrics.passkey_prompts(tok, [700, 900], [0.1, 0.8], trials=2, seed=3)
    assert len(prompts) == 8 and len({p.key for p in prompts}) == 8
    for p in prompts:
        assert p.ids.numel() == p.length
        text = tok.decode(p.ids.tolist())
        assert text.count(p.key) == 2
        assert text[p.needle_pos:].startswith(" The pass key is " + p.key)
        assert text.endswith(metrics.PASSKEY_QUESTION)
    near = [p for p in prompts if p.depth == 0.8]
    far = [p for p in prompts if p.depth == 0.1]
    assert min(p.needle_distance for p in far) > max(p.needle_distance for p in near)


# -- the CLI end to end ------------------------------------------------------------------------

def test_cli_end_to_end_on_a_tiny_model(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("Now is the winter of our discontent made glorious summer. " * 40)
    out = tmp_path / "out"
    rc = cli.main(["--model", "tiny-random", "--text", str(text), "--rows",
                   "seed,k3v3:w0:s0,vllm-k3v4_nc,kivi2,k4v4:b1", "--ppl-length", "300",
                   "--ppl-windows", "2", "--passkey-lengths", "400", "--passkey-depths", "0.1",
                   "--attn-length", "200", "--window", "64", "--threads", "1", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "float32" in printed and "k3v3:s0:w0:b0" in printed
    data = json.loads((out / "results.json").read_text())
    rows = {r["row"]: r for r in data["rows"]}
    assert list(rows) == ["baseline", "seed:s4:w64:b0", "k3v3:s0:w0:b0",
                          "vllm-k3v4_nc:s4:w64:b0", "kivi2:s4:w64:b0", "k4v4:s4:w64:b1"]
    base = rows["baseline"]
    assert base["tokens"] == 2 * 299 and math.isfinite(base["ppl"]) and base["ppl"] > 1
    assert base["bits_per_channel"] == 16.0 and base["attn_err_mean"] == 0.0
    for name, r in rows.items():
        assert len(r["attn_err_per_layer"]) == 2 and len(r["passkey_trials"]) == 1
        assert math.isfinite(r["ppl"])
    # every token compressed on write: layer outputs differ from exact attention, and the cache
    # holds exactly the format's 52 bytes per token and head (3.25 bits/channel)
    assert rows["k3v3:s0:w0:b0"]["attn_err_mean"] > 1e-3
    assert rows["k3v3:s0:w0:b0"]["held_bits_per_channel"] == 3.25
    # with 2 layers and boundary 1, both layers are exact: the baseline up to fp32 summation order
    exact = rows["k4v4:s4:w64:b1"]
    assert exact["bits_per_channel"] == 16.0 and exact["attn_err_max"] < 1e-5
    assert exact["ppl"] == pytest.approx(base["ppl"], rel=1e-5)
    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6
    assert (out / "ppl_vs_bits.png").stat().st_size > 1000


@pytest.mark.slow
def test_default_run_on_smollm2(tmp_path):
    """The README's main command: the embedded default on SmolLM2-135M and Hamlet."""
    pytest.importorskip("gguf")
    rc = cli.main(["--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    base = rows[0]
    assert base["row"] == "baseline" and 5 < base["ppl"] < 40
    assert base["passkey"].split("/")[0] == base["passkey"].split("/")[1]
