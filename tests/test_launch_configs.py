"""Launch configs as functions of shapes only.  The decode kernel's split count
(tq_ops.triton.decode.num_splits) fills at most whole waves of resident programs (one, as the
op launches it, or more for the tuning scripts), prefers long splits while a wave stays busy
enough, gives every split an equal share of tiles, never splits finer than
min_tokens_per_split positions, and stays within [1, max_splits]; the encode kernel's config
(tq_ops.triton.encode.encode_config) depends on the write's size."""
import dataclasses
import os

import pytest

from tq_ops.config import PRESET_FIELDS
from tq_ops.triton.decode import DECODE_CONFIGS, DEFAULT_DECODE, num_splits
from tq_ops.triton.encode import (DEFAULT_ENCODE, ENCODE_CONFIGS, FP32_ENCODE, LATENCY_ROWS,
                                  encode_config, pair_configs)

SMS = 132  # an H100's SM count; the rule is the same for any count
# (batch, context): the issue's decode shapes, plus a batch larger than one wave of programs
SHAPES = [(1, 4096), (1, 32768), (1, 131072), (8, 4096), (8, 32768), (32, 16384), (64, 8192),
          (256, 2048), (1, 64), (3, 100)]
CONFIGS = {"default": DEFAULT_DECODE} | {f"{a}-d{d}-k{k}": c
                                         for (a, d, k), c in DECODE_CONFIGS.items()}


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("batch,ctx", SHAPES, ids=[f"b{b}-ctx{c}" for b, c in SHAPES])
@pytest.mark.parametrize("waves", [1, 2])
@pytest.mark.parametrize("tile", [None, 16])
def test_split_count_fills_whole_waves_in_equal_shares(cfg, batch, ctx, waves, tile):
    hkv = 8
    rows = batch * hkv
    ns = num_splits(batch, hkv, ctx, SMS, cfg, waves=waves, tile=tile)
    slots = waves * cfg.resident_programs_per_sm * SMS
    cap = max(1, ctx // cfg.min_tokens_per_split)
    tiles = ceil_div(ctx, tile or cfg.block_n)
    assert 1 <= ns <= cfg.max_splits
    assert ns <= cap
    # 1: the count that fills the waves: no partial wave beyond the requested ones, and no
    # room for one more split per row unless a cap stopped it
    most = min(slots // rows, cap, cfg.max_splits) if rows <= slots else 1
    if rows <= slots:
        assert rows * most <= slots
        assert rows * (most + 1) > slots or most in (cap, cfg.max_splits)
    # 2: within it, long splits unless that leaves too much of one wave idle
    one_wave = cfg.resident_programs_per_sm * SMS
    long_enough = ceil_div(ctx, cfg.split_positions)
    busy_enough = ceil_div(int(cfg.wave_fill * one_wave), rows)
    chosen = min(most, max(long_enough, busy_enough))
    # 3: the fewest splits with the chosen count's longest program, so no split is empty
    per = ceil_div(tiles, chosen)
    assert ns <= most
    assert ceil_div(tiles, ns) == per
    assert ns == 1 or ceil_div(tiles, ns - 1) > per
    assert (ns - 1) * per < tiles


def test_split_counts_at_the_issue_shapes():
    """The counts that timed best (or within 1% of the best) among those swept on the H200
    (132 SMs, page 64, perf/NOTES.md, session 14): the rule must keep picking them."""
    cfg = DECODE_CONFIGS[("sm90", 128, 2)]
    want = {(1, 4096): 64, (1, 32768): 128, (1, 131072): 187, (8, 4096): 16, (8, 32768): 24,
            (32, 16384): 6, (64, 8192): 3}
    got = {shape: num_splits(shape[0], 8, shape[1], 132, cfg, tile=64) for shape in want}
    assert got == want


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_page_tile_is_inside_a_page_or_whole_pages_and_avoids_32_at_head_dim_128(cfg):
    """A tile lies inside one page (the tile divides the page) or holds whole pages (the page
    divides the tile, which is then cfg.block_n: attend_pages' MULTI_PAGE)."""
    from tq_ops.triton.decode import page_tile

    for head_dim in (64, 96, 128, 256):
        for block_size in (16, 32, 48, 64, 96, 128, 256):
            tile = page_tile(block_size, cfg, head_dim)
            inside = block_size % tile == 0 and cfg.block_n % tile == 0
            whole_pages = tile == cfg.block_n and tile % block_size == 0
            assert inside or whole_pages, (head_dim, block_size, tile)
            assert tile != 32 or head_dim != 128
    if cfg.block_n == 64:
        # pages of 16 and 32 tokens: 64-token tiles of 4 and 2 pages; 48 and 96: 16 inside
        assert [page_tile(bs, cfg, 128) for bs in (16, 32, 48, 96)] == [64, 64, 16, 16]
        assert page_tile(96, cfg, 64) == 32
    assert page_tile(128, cfg, 128) == cfg.block_n


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_l2_hint_only_for_tiles_inside_one_page_on_cuda(block_size):
    """The split kernel's L2 hint (attend_pages' PREFETCH) covers one page region of a KV head
    (block_size x slot bytes): on CUDA, for tiles inside one page, with 16-byte multiples of
    strides, and not when the config switches it off.  Multi-page tiles measured slower with it
    (perf/NOTES.md, session 25); the interpreter has no such instruction."""
    import dataclasses

    from tq_ops import layout
    from tq_ops.ops.paged_decode_attention import split_constants
    from tq_ops.triton.decode import decode_config, page_tile

    cfg = decode_config("sm90", 128, 2)
    slot = layout.SlotLayout(128, 2, True, 3).slot_bytes
    tile = page_tile(block_size, cfg, 128)
    stride = 8 * block_size * slot

    def hint(on_cuda=True, page_stride=stride, c=cfg):
        return split_constants(8, 4, 128, 2, True, 3, block_size, tile, page_stride, on_cuda,
                               c.l2_prefetch)["PREFETCH"]

    want = block_size * slot if block_size >= tile else 0
    assert hint() == want
    assert hint(on_cuda=False) == 0
    assert hint(page_stride=stride + 8) == 0
    assert hint(c=dataclasses.replace(cfg, l2_prefetch=False)) == 0


def test_l2_hint_needs_an_arch_with_bulk_prefetch():
    """cp.async.bulk.prefetch is PTX for sm_90 and later; on an A100 or an L40 the kernel with
    the hint would not compile, so the launcher asks has_bulk_prefetch first."""
    from tq_ops.triton.launch import has_bulk_prefetch

    assert [has_bulk_prefetch(a) for a in ("sm80", "sm86", "sm89", "sm90", "sm100", "sm120",
                                           "cpu")] == [False, False, False, True, True, True,
                                                       False]


# -- the encode kernel's config (tq_ops.triton.encode.encode_config) ---------------------------

ENCODE_KEYS = list(ENCODE_CONFIGS)


def _encode_id(key):
    a, d, b, exact16 = key
    return f"{a}-d{d}-b{b}" + ("-exact16" if exact16 else "")


@pytest.mark.parametrize("key", ENCODE_KEYS, ids=[_encode_id(k) for k in ENCODE_KEYS])
def test_encode_config_by_write_size(key):
    arch, head_dim, bits, exact16 = key
    # a decode step's write (at most LATENCY_ROWS tokens x heads) takes the low-latency tile ...
    for rows in (1, 8, LATENCY_ROWS):
        assert encode_config(arch, head_dim, bits, rows, exact16=exact16) == DEFAULT_ENCODE
    # ... a prefill's write the table's bulk config
    assert encode_config(arch, head_dim, bits, LATENCY_ROWS + 1,
                         exact16=exact16) == ENCODE_CONFIGS[key]
    assert encode_config(arch, head_dim, bits, 32768 * 8, exact16=exact16) == ENCODE_CONFIGS[key]


def test_encode_config_default_for_unknown_shapes():
    assert encode_config("sm80", 128, 2, 1 << 20) == DEFAULT_ENCODE
    assert encode_config("sm90", 96, 2, 1 << 20) == DEFAULT_ENCODE
    assert encode_config("sm90", 96, 2, 1 << 20, exact16=True) == DEFAULT_ENCODE


@pytest.mark.parametrize("fmt", list(PRESET_FIELDS))
def test_pair_configs_by_write_size(fmt):
    """A cache write's key and value configs: DEFAULT_ENCODE up to LATENCY_ROWS rows (a decode
    step's write), DEFAULT_ENCODE for both from there up to one 64-row tile per SM (a small
    bulk write: one launch of one tile per program), then each kind's encode_config; fp32
    input keeps FP32_ENCODE."""
    kb, vb = PRESET_FIELDS[fmt]["key_mse_bits"], PRESET_FIELDS[fmt]["value_bits"]
    limit = DEFAULT_ENCODE.rows * SMS
    for rows in (1, LATENCY_ROWS, LATENCY_ROWS + 1, limit):
        assert pair_configs("sm90", 128, kb, vb, rows, SMS) == (DEFAULT_ENCODE,) * 2
    for rows in (limit + 1, 32768 * 8):
        assert pair_configs("sm90", 128, kb, vb, rows, SMS) == (
            encode_config("sm90", 128, kb, rows), encode_config("sm90", 128, vb, rows))
    assert pair_configs("sm90", 128, kb, vb, LATENCY_ROWS + 1, SMS, key_fp32=True) == (
        FP32_ENCODE, encode_config("sm90", 128, vb, LATENCY_ROWS + 1))


# An H100/H200 SM gives one program at most this much shared memory (the limit Triton reports
# when a launch asks for more: "Hardware limit: 232448"); all resident programs together get
# SM90_SM_SHARED, less 1 KB the hardware reserves per program (CUDA guide, H100 compute data).
SM90_MAX_SHARED = 232448
SM90_SM_SHARED = 233472
ENCODE_CASES = [(a, d, b, e, x) for a, d, b, e in ENCODE_KEYS if a == "sm90"
                for x in ("fp16", "bf16", "fp32")] + [("sm90", 128, 2, False, "fp32-default"),
                                              ("sm90", 128, 3, False, "fp32-default")]


def _compile_sm90(kernel_fn, consts: dict, input_types: dict[str, str], num_warps: int):
    """kernel_fn compiled for sm_90 offline (Triton ships ptxas) as a bulk write launches it:
    the input pointers named in input_types as "fp16"/"bf16"/"fp32"(-...), the cache *u8, the
    slot mapping *i32, other pointers *fp32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel_fn.arg_names
    sig = {n: "constexpr" if n in consts else
           {"fp16": "*fp16", "bf16": "*bf16"}.get(input_types[n], "*fp32")
           if n in input_types else
           "*u8" if n == "out_ptr" else "*i32" if n == "slot_ptr" else
           "*fp32" if n.endswith("_ptr") else "i32" for n in names}
    # specialised as a real launch is (16-byte aligned tensors, strides divisible by 16): the
    # loads then pipeline through shared memory, 32-64 KB more than an unspecialised compile
    # (H200, session 22: these compiles gave the launched variants' sizes to the byte)
    aligned = [n for n in names if n not in consts and n != "slot_ptr"
               and (n.endswith("_ptr") or n in ("x_st", "x_sh", "k_st", "k_sh", "v_st", "v_sh",
                                                 "page_stride", "head_stride"))]
    src = ASTSource(kernel_fn, sig,
                    constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps))


@pytest.mark.parametrize("arch,head_dim,bits,exact16,x_type", ENCODE_CASES,
                         ids=[f"{a}-d{d}-b{b}{'-exact16' if e else ''}-{x}"
                              for a, d, b, e, x in ENCODE_CASES])
def test_encode_config_fits_shared_memory(arch, head_dim, bits, exact16, x_type):
    """Compiles the encode kernel for sm_90 offline (Triton ships ptxas) as a bulk write of that
    input type launches it, and checks the shared memory it asks for: within one program's
    limit, and programs_per_sm of them within an SM's (else the persistent grid's programs
    would run in more than one wave).  The 128-row key tile with fp32 input once asked for
    320 KB and failed at launch on an H200 (encode_keys on fp32 keys)."""
    import triton

    from tq_ops import preset
    from tq_ops.triton.encode import MODE_CACHE, encode_kernel
    from tq_ops.triton.unpack import group_width

    if not hasattr(encode_kernel, "params"):
        pytest.skip("TRITON_INTERPRET=1: no compiled kernels")
    fp32 = x_type.startswith("fp32")
    cfg = (DEFAULT_ENCODE if x_type == "fp32-default"
           else encode_config(arch, head_dim, bits, 1 << 20, fp32, exact16))
    fmt = preset("seed", head_dim=head_dim)
    qjl = bits == fmt.key_mse_bits and fmt.use_qjl
    consts = dict(H=8, D=head_dim, DP=max(16, triton.next_power_of_2(head_dim)),
                  DG=group_width(head_dim), TB=cfg.rows, BITS=bits, QJL=qjl, BS=128, OFF_C=0,
                  OFF_S=0, OFF_N=0, OFF_G=0, MODE=MODE_CACHE, NORM_F32=False, X_F32=fp32,
                  EXACT16=exact16)
    kernel = _compile_sm90(encode_kernel, consts, {"x_ptr": x_type}, cfg.num_warps)
    assert kernel.metadata.shared <= SM90_MAX_SHARED, (
        f"{cfg} asks for {kernel.metadata.shared} bytes of shared memory")
    if x_type != "fp32-default":   # a decode-sized write: at most two programs in all
        assert cfg.programs_per_sm * (kernel.metadata.shared + 1024) <= SM90_SM_SHARED, (
            f"{cfg.programs_per_sm} programs of {kernel.metadata.shared} bytes do not fit one SM")


# bulk writes whose key and value launches share a config run as one joint launch
# (tq_ops.ops.write_cache.launch_write_cache): sm_90 formats at head_dim 128 where they do
JOINT_CASES = [(f, e, x) for f in ("seed", "k3v3", "k4v4") for e in (False, True)
               for x in ("fp16", "bf16", "fp32")
               if encode_config("sm90", 128, PRESET_FIELDS[f]["key_mse_bits"], 1 << 20,
                                x == "fp32", e)
               == encode_config("sm90", 128, PRESET_FIELDS[f]["value_bits"], 1 << 20,
                                x == "fp32", e)]


def _compile_joint(fmt: str, cfg, x_type: str, exact16: bool, one_tile: bool):
    """encode_pair_kernel with JOINT for sm_90 (_compile_sm90), format `fmt` at head_dim 128,
    tile cfg, K and V of x_type."""
    from tq_ops import preset
    from tq_ops.triton.encode import encode_pair_kernel
    from tq_ops.triton.unpack import group_width

    f = preset(fmt, head_dim=128)
    fp32 = x_type == "fp32"
    consts = dict(H=8, D=128, DP=128, DG=group_width(128), TB=cfg.rows, K_BITS=f.key_mse_bits,
                  QJL=f.use_qjl, V_BITS=f.value_bits, BS=128, K_OFF_C=0, K_OFF_S=0, K_OFF_N=0,
                  K_OFF_G=0, V_OFF_C=0, V_OFF_N=0, K_F32=fp32, V_F32=fp32, EXACT16=exact16,
                  JOINT=True, ONE_TILE=one_tile)
    return _compile_sm90(encode_pair_kernel, consts, {"k_ptr": x_type, "v_ptr": x_type},
                         cfg.num_warps)


@pytest.mark.parametrize("one_tile", [False, True], ids=["round-robin", "one-tile"])
@pytest.mark.parametrize("fmt,exact16,x_type", JOINT_CASES,
                         ids=[f"{f}{'-exact16' if e else ''}-{x}" for f, e, x in JOINT_CASES])
def test_joint_encode_fits_shared_memory(fmt, exact16, x_type, one_tile):
    """The joint launch (encode_pair_kernel's JOINT: each program encodes key tiles, then value
    tiles; with ONE_TILE one tile of one kind) asks for no more shared memory per program than
    the config allows: the two loops' pipeline buffers must share it, not add up (sm_90
    compile, seed format EXACT16 fp16: 100,352 bytes, as the key launch alone)."""
    from tq_ops.triton.encode import encode_pair_kernel

    if not hasattr(encode_pair_kernel, "params"):
        pytest.skip("TRITON_INTERPRET=1: no compiled kernels")
    cfg = encode_config("sm90", 128, PRESET_FIELDS[fmt]["key_mse_bits"], 1 << 20,
                        x_type == "fp32", exact16)
    kernel = _compile_joint(fmt, cfg, x_type, exact16, one_tile)
    assert cfg.programs_per_sm * (kernel.metadata.shared + 1024) <= SM90_SM_SHARED, (
        f"{cfg.programs_per_sm} joint programs of {kernel.metadata.shared} bytes do not fit "
        "one SM")


# small bulk writes (pair_configs) of formats whose bulk configs are not DEFAULT_ENCODE
SMALL_BULK_CASES = [(f, x) for f in PRESET_FIELDS for x in ("fp16", "bf16")
                    if (encode_config("sm90", 128, PRESET_FIELDS[f]["key_mse_bits"], 1 << 20),
                        encode_config("sm90", 128, PRESET_FIELDS[f]["value_bits"], 1 << 20))
                    != (DEFAULT_ENCODE, DEFAULT_ENCODE)]


@pytest.mark.parametrize("fmt,x_type", SMALL_BULK_CASES,
                         ids=[f"{f}-{x}" for f, x in SMALL_BULK_CASES])
def test_small_bulk_joint_fits_one_program(fmt, x_type):
    """A small bulk write's joint launch (DEFAULT_ENCODE, ONE_TILE) asks for no more shared
    memory than one program may have.  Its grid is not persistent, so programs beyond what
    an SM holds at once wait for a slot (the seed format's split-precision keys at 64 rows:
    165,888 bytes, one program per SM)."""
    from tq_ops.triton.encode import encode_pair_kernel

    if not hasattr(encode_pair_kernel, "params"):
        pytest.skip("TRITON_INTERPRET=1: no compiled kernels")
    kernel = _compile_joint(fmt, DEFAULT_ENCODE, x_type, False, True)
    assert kernel.metadata.shared <= SM90_MAX_SHARED, (
        f"a small bulk write's program asks for {kernel.metadata.shared} bytes")


# -- no specialisation on run-time values (tq_ops.triton.launch) -------------------------------
# A serving step's counts and metadata-slice offsets change from step to step; a kernel that
# specialised on them would compile a new variant mid-serving.  perf/gpu_check.py checks the
# behaviour on a GPU ("no recompiles on run-time values"); this checks the declarations on CPU.

def _kernels():
    from tq_ops.triton import codec, decode, encode, prefill
    return {
        "query_prep_kernel": (decode.query_prep_kernel, ["rows"], []),
        "decode_split_kernel": (decode.decode_split_kernel, ["kv_start", "num_splits"],
                                ["bt_ptr", "kv_lens_ptr", "raw_idx_ptr", "raw_lens_ptr"]),
        "decode_merge_kernel": (decode.decode_merge_kernel, ["num_splits", "rows"], []),
        "decode_merge_fallback_kernel": (decode.decode_merge_fallback_kernel,
                                         ["kv_start", "num_splits", "rows"],
                                         ["bt_ptr", "kv_lens_ptr"]),
        "prefill_kernel": (prefill.prefill_kernel, ["kv_start", "n_seqs"],
                           ["cu_ptr", "bt_ptr", "prefix_ptr", "raw_idx_ptr", "raw_lens_ptr"]),
        "encode_kernel": (encode.encode_kernel, ["n_rows"], ["slot_ptr"]),
        "encode_pair_kernel": (encode.encode_pair_kernel, ["n_rows"], ["slot_ptr"]),
        "rotate_kernel": (codec.rotate_kernel, ["rows"], []),
        "qjl_sketch_kernel": (codec.qjl_sketch_kernel, ["rows"], []),
        "mse_dequantize_kernel": (codec.mse_dequantize_kernel, ["rows"], []),
        "key_scores_kernel": (codec.key_scores_kernel, ["tq", "tk"], []),
    }


@pytest.mark.parametrize("name", list(_kernels()))
def test_kernel_does_not_specialise_on_run_time_values(name):
    fn, ints, pointers = _kernels()[name]
    if not hasattr(fn, "params"):
        pytest.skip("TRITON_INTERPRET=1: the interpreter's kernels do not specialise")
    params = {p.name: p for p in fn.params}
    for arg in ints:
        assert params[arg].do_not_specialize, f"{name}: {arg} would select a compiled variant"
    for arg in pointers:
        assert params[arg].do_not_specialize_on_alignment, (
            f"{name}: the alignment of {arg} would select a compiled variant")


@pytest.mark.parametrize("name", list(_kernels()))
def test_kernel_takes_every_argument_from_its_launch(name):
    """No launched kernel has a defaulted parameter, so a launch that leaves one out fails at
    once, on CPU too.  torch.compile's inductor (torch 2.11) compiled decode_merge_fallback_kernel
    with None for the TILE a per-row launch left to its default: perf/gpu_check.py's
    graphs/compile failed on an H200 (perf/NOTES.md, session 36) while eager launches passed."""
    import inspect

    fn = _kernels()[name][0]
    defaulted = [p.name for p in inspect.signature(fn.fn).parameters.values()
                 if p.default is not inspect.Parameter.empty]
    assert not defaulted, f"{name}: defaults for {defaulted}"


def test_traced_decode_launch_drops_the_register_cap_and_its_decoders():
    """torch.compile's tracing of wrap_triton rejects `maxnreg`: a traced launch gets the
    decoders that need no cap; an eager CUDA launch gets the cap and the table's decoders."""
    from unittest import mock

    from tq_ops.ops.paged_decode_attention import split_launch
    from tq_ops.triton.decode import decode_config

    row = decode_config("sm90", 128, 2)
    assert row.max_registers and row.key_planes and row.value_words
    with mock.patch("torch._library.triton.is_wrap_triton_enabled", return_value=False):
        eager, opts = split_launch(row, on_cuda=True)
    assert eager == row and opts == {"maxnreg": row.max_registers}
    with mock.patch("torch._library.triton.is_wrap_triton_enabled", return_value=True):
        traced, opts = split_launch(row, on_cuda=True)
    assert opts == {} and not traced.key_planes and not traced.value_words
    assert traced.resident_programs_per_sm == row.resident_programs_per_sm
    uncapped = dataclasses.replace(row, max_registers=0, key_planes=False, value_words=False)
    with mock.patch("torch._library.triton.is_wrap_triton_enabled", return_value=True):
        assert split_launch(uncapped, on_cuda=True) == (uncapped, {})
    # a bare launch (launch's raw=True: the interpreter tests, the perf tools) is not traced,
    # whatever wrap_triton's switch says: it takes the row as it is
    with mock.patch("torch._library.triton.is_wrap_triton_enabled", return_value=True):
        assert split_launch(row, on_cuda=True, bare=True) == (row, {"maxnreg": row.max_registers})


@pytest.mark.parametrize("splits", [1, 3, 24, 32, 33, 64, 65, 128, 129, 187, 256])
def test_merge_step_takes_all_partials_in_one_step_when_it_can(splits):
    """The merge's partials per step (paged_decode_attention.merge_step): the narrowest of
    MERGE_STEPS that covers every partial, else the widest."""
    import importlib

    P = importlib.import_module("tq_ops.ops.paged_decode_attention")
    step = P.merge_step(splits)
    assert step in P.MERGE_STEPS
    if splits <= P.MERGE_STEPS[-1]:
        assert step >= splits
        assert all(s < splits for s in P.MERGE_STEPS if s < step)
    else:
        assert step == P.MERGE_STEPS[-1]


# (head_dim, GQA group, decoded): the prefill blocks were chosen at groups of 4
# (tq_ops.triton.prefill.prefill_config); wider groups keep their rows with fewer query tokens
PREFILL_CASES = [(128, 4, False), (128, 8, False), (128, 16, False), (64, 8, False),
                 (256, 8, False), (128, 4, True), (128, 8, True), (128, 32, True)]


def _sass_report():
    """perf/sass_report.py as a module: its offline sm_90 compiles of the launched kernels."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf",
                        "sass_report.py")
    spec = importlib.util.spec_from_file_location("sass_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("head_dim,group,decoded", PREFILL_CASES,
                         ids=[f"d{d}-g{g}{'-decoded' if dec else ''}"
                              for d, g, dec in PREFILL_CASES])
def test_prefill_config_fits_shared_memory(head_dim, group, decoded):
    """Compiles the prefill kernel for sm_90 offline at prefill_config's block for the group (as
    perf/sass_report.py --kernel prefill does) and checks its shared memory against one
    program's limit.  At the group-of-4 block a group of 8 at D = 128 asked for 294,912 bytes
    and failed at launch on an H200 (gpu_check's gqa8 case, session 29)."""
    from tq_ops.triton.prefill import prefill_config, prefill_kernel

    if not hasattr(prefill_kernel, "params"):
        pytest.skip("TRITON_INTERPRET=1: no compiled kernels")
    sass_report = _sass_report()
    import triton

    block_q, warps = prefill_config(head_dim, decoded, group)
    assert block_q * triton.next_power_of_2(group) <= prefill_config(head_dim, decoded)[0] * 4
    kernel = sass_report.compile_prefill("seed", head_dim, group, 64, block_q, warps, 0, decoded)
    assert kernel.metadata.shared <= SM90_MAX_SHARED, (
        f"BLOCK_Q {block_q} x group {group} asks for {kernel.metadata.shared} bytes")


# (head_dim, GQA group): the merge's 16-row tiles (paged_decode_attention.merge_tiles) at the
# head widths that take them (padded widths up to WHOLE_MATRIX_COLUMNS) and groups whose rows
# straddle tiles (3) or fill them (16)
MERGE_TILE_CASES = [(128, 4), (128, 1), (128, 16), (96, 3), (64, 3)]


@pytest.mark.parametrize("head_dim,group", MERGE_TILE_CASES,
                         ids=[f"d{d}-g{g}" for d, g in MERGE_TILE_CASES])
def test_merge_tile_compiles_within_registers_and_shared_memory(head_dim, group):
    """decode_merge_kernel with TILE compiled for sm_90 offline (as perf/sass_report.py --kernel
    merge does at few splits): no spills (a whole-Pi tf32x3 operand spilled 9.6 KB, session 34)
    and shared memory within one program's limit."""
    import importlib

    from tq_ops.triton.decode import decode_merge_kernel
    from tq_ops.triton.unpack import group_width

    if not hasattr(decode_merge_kernel, "params"):
        pytest.skip("TRITON_INTERPRET=1: no compiled kernels")
    import triton

    P = importlib.import_module("tq_ops.ops.paged_decode_attention")
    sass_report = _sass_report()
    dp = 8 * group_width(head_dim)
    assert P.merge_tiles(P.MERGE_TILE_MAX_SPLITS, dp)
    consts = dict(HKV=8, G=group, GP=max(2, triton.next_power_of_2(group)), D=head_dim, DP=dp,
                  JB=P.MERGE_TILE_COLUMNS, SC=P.MERGE_TILE_STEP, PI_FIRST=True,
                  TILE=P.MERGE_TILE_ROWS)
    kernel = sass_report.compile_small("merge", P.MERGE_WARPS, consts)
    summary = " ".join(sass_report.ptxas_summary(kernel.asm["ptx"]))
    assert "0 bytes spill stores" in summary, summary
    assert kernel.metadata.shared <= SM90_MAX_SHARED, kernel.metadata.shared


def test_merge_tiles_only_with_few_splits_and_whole_matrices():
    """The merge's mode is a function of the split count and the padded head width only
    (paged_decode_attention.merge_tiles): tiles up to MERGE_TILE_MAX_SPLITS splits at widths up
    to WHOLE_MATRIX_COLUMNS, one program per row otherwise (24 splits at (8, 32k) took 13%
    longer in tiles, session 34)."""
    import importlib

    P = importlib.import_module("tq_ops.ops.paged_decode_attention")
    most = P.MERGE_TILE_MAX_SPLITS
    assert all(P.merge_tiles(n, 128) for n in range(1, most + 1))
    assert not any(P.merge_tiles(n, 128) for n in (most + 1, 24, 187))
    assert not P.merge_tiles(1, 256)
    # the table's shapes on an H200 (132 SMs, page 64): (64, 8k) and (32, 16k) take tiles,
    # (8, 32k) and every batch-1 shape do not
    cfg = DECODE_CONFIGS[("sm90", 128, 2)]
    for batch, ctx, tiles in ((64, 8192, True), (32, 16384, True), (8, 32768, False),
                              (1, 131072, False), (1, 4096, False)):
        ns = num_splits(batch, 8, ctx, 132, cfg, tile=64)
        assert P.merge_tiles(ns, 128) == tiles, (batch, ctx, ns)


@pytest.mark.parametrize("rows", [1, 9, 32, 66, 67, 256])
def test_prep_splits_a_row_in_two_only_while_each_program_has_an_sm(rows):
    """query_prep_kernel's one-row programs come two per row (key and sign halves apart) only
    with QJL and while 2 * rows programs fit the SMs (paged_decode_attention.prep_parts: at 256
    rows the extra matrix reads from L2 cost more than the shorter chain saved)."""
    import importlib

    P = importlib.import_module("tq_ops.ops.paged_decode_attention")
    two = P.prep_parts(rows, 1, True, SMS)
    assert two == (2 if 2 * rows <= SMS else 1)
    assert P.prep_parts(rows, 1, False, SMS) == 1
    assert P.prep_parts(rows, P.PREP_ROWS, True, SMS) == 1
    assert P.prep_grid(rows, 1, two) == (rows, two)


def _dot_operand_bases(shape: list[int], k_width: int) -> tuple[list, list]:
    """(register bases, lane bases) of Triton's one-warp MMA v2 operand A layout of `shape`
    and kWidth (as gluon reports them), each basis [row step, column step]."""
    from triton._C.libtriton import gluon_ir, ir
    from triton.experimental.gluon.language import _layouts as L

    ctx = ir.context()
    ir.load_dialects(ctx)
    builder = gluon_ir.GluonOpBuilder(ctx)
    mma = L.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    op = L.DotOperandLayout(operand_index=0, parent=mma, k_width=k_width)
    ll = builder.to_linear_layout(op._to_ir(builder), shape)
    return [list(b) for b in ll.reg_bases], [list(b) for b in ll.lane_bases]


@pytest.mark.parametrize("block_size", [16, 64], ids=["page16", "page64"])
def test_folded_decoders_see_the_operand_layouts_they_assume(block_size):
    """At head_dim 64 the split kernel's fast decoders are folded: each operand holds every
    code word twice and its second half decodes other groups (unpack.fold_group_dims,
    key_plane_folded, sign_plane_folded).  Which elements are the second half depends on
    Triton's MMA operand layout: for the values (16 x 64, from 8-bit loads: kWidth 4) and the
    key planes (64 x 16 int16: kWidth 2) elements 4-7 of a thread's 8 (register base 2 is
    row + 8, resp. column + 8); for the signs (64 x 16 int8: kWidth 4) lane bit 1 (column +
    8).  A compiler that picked other layouts would decode the wrong groups, so the sm_90
    compile (offline, as perf/sass_report.py) is read for the layout of every folded call,
    and those layouts for the bases the decoders assume."""
    import re

    from tq_ops.triton.decode import decode_split_kernel

    if not hasattr(decode_split_kernel, "params"):
        pytest.skip("TRITON_INTERPRET=1: no compiled kernels")
    sass_report = _sass_report()
    kernel = sass_report.compile_split("seed", 64, 3, block_size, 64, 1, 2, 168, True)
    operand = re.compile(r"%\S+ : tensor<(\d+)x(\d+)x(i\d+), #ttg\.dot_op<\{opIdx = 0, "
                         r"parent = #mma\d*, kWidth = (\d+)\}>>")
    found = {"values": 0, "keys": 0, "signs": 0}
    for ln in kernel.asm["ttgir"].splitlines():
        if "elementwise_inline_asm" not in ln or "cp.async.bulk.prefetch" in ln:
            continue
        got = operand.search(ln)
        assert got, ln[-300:]
        shape, dtype, k_width = [int(got[1]), int(got[2])], got[3], int(got[4])
        if "packed_element = 8" in ln and dtype == "i32":
            kind, want = "values", (shape == [16, 64] and k_width == 4)
        elif "packed_element = 8" in ln:
            kind, want = "keys", (dtype == "i16" and shape[1] == 16 and k_width == 2)
        elif "%laneid" in ln:
            kind, want = "signs", (dtype == "i8" and shape[1] == 16 and k_width == 4)
        else:
            raise AssertionError(f"an unfolded decoder at head_dim 64: {ln[-300:]}")
        assert want, f"{kind}: {shape} {dtype} kWidth {k_width}"
        found[kind] += 1
        regs, lanes = _dot_operand_bases(shape, k_width)
        if kind == "values":
            assert regs[:3] == [[0, 1], [0, 2], [8, 0]]
        elif kind == "keys":
            assert regs[:3] == [[0, 1], [8, 0], [0, 8]]
        else:
            assert regs[:2] == [[0, 1], [0, 2]] and lanes[1] == [0, 8]
    # per tile: 2 value calls, 4 groups x (high, low) key planes, 4 sign planes
    assert found == {"values": 2, "keys": 8, "signs": 4}


# -- cache-write variants (tq_ops.ops.write_cache.write_variant) -------------------------------
# A serving process warms the cache writes up once (warm_up_write_cache): one write per
# WriteVariant.  This checks, without a GPU, that the variants cover every launch: the kernels
# and constexprs that writes of each size up to the limit launch are those of the warm-up's
# writes.  perf/gpu_check.py ("cache-write warm-up") checks that no write then compiles.

WARM_UP_CASES = [("seed", True, "bfloat16"), ("seed", False, "float16"),
                 ("k3v3", True, "float16"), ("k4v4", False, "float32"),
                 ("k2q1v2", True, "bfloat16")]
WARM_UP_MAX_TOKENS = 12000   # past EXACT16_MIN_ROWS / 8 heads, below vLLM's 16384 default
WARM_UP_SMS = 132            # an H100 / H200


@pytest.mark.parametrize("fmt,exact16,dtype", WARM_UP_CASES,
                         ids=[f"{f}-{'exact16' if e else 'split'}-{t}"
                              for f, e, t in WARM_UP_CASES])
def test_write_variants_cover_every_write_launch(fmt, exact16, dtype, monkeypatch):
    import importlib

    import torch

    from tq_ops import preset

    W = importlib.import_module("tq_ops.ops.write_cache")
    launched: set = set()

    class Recorder:
        """Stands in for a kernel: records each launch's kernel and keyword (constexpr) args."""

        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.add((self.name, tuple(sorted(kwargs.items()))))
            return launch

    monkeypatch.setattr(W, "encode_pair_kernel", Recorder("encode_pair_kernel"))
    monkeypatch.setattr(W, "encode_kernel", Recorder("encode_kernel"))
    monkeypatch.setattr(W, "arch", lambda device: "sm90")
    monkeypatch.setattr(W, "sm_count", lambda device: WARM_UP_SMS)
    cfg = preset(fmt, head_dim=128)
    h, d = 8, 128
    x = torch.zeros(WARM_UP_MAX_TOKENS, h, d, dtype=getattr(torch, dtype))
    slots = torch.zeros(WARM_UP_MAX_TOKENS, dtype=torch.int64)
    cache = torch.zeros(1, h, 16 * cfg.slot_bytes, dtype=torch.uint8)
    mats = (torch.zeros(d, d), torch.zeros(d, d), torch.zeros(4), torch.zeros(8))

    def launches(token_counts):
        launched.clear()
        for t in token_counts:
            W.launch_write_cache(x[:t], x[:t], cache, slots[:t], *mats, cfg.key_mse_bits,
                                 cfg.use_qjl, cfg.value_bits, raw=True, exact16=exact16)
        return set(launched)

    tokens = W.write_variant_tokens("sm90", WARM_UP_SMS, d, h, cfg.key_mse_bits, cfg.value_bits,
                                    WARM_UP_MAX_TOKENS, dtype == "float32", exact16)
    warm = launches(tokens)
    every = launches(range(1, WARM_UP_MAX_TOKENS + 1))
    assert every == warm, f"writes launch variants the warm-up {tokens} does not: {every - warm}"
    # the sizes cross every regime of launch_write_cache: decode-step, one-tile and tiled bulk
    assert len(tokens) >= 3, tokens
