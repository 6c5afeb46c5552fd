"""Generates nf4/extra.safetensors (see EXTRA.md) and the data behind src/quant/rcp_approx.zip.

Run from the repository root on a CUDA machine with torch and cupy, the bitsandbytes 0.50.2 wheel
unpacked into ./pkg beside this script:  OUT=/tmp/out python3 tests/golden/nf4/make_extra.py
Writes $OUT/rcp_delta.npy (MUFU.RCP minus correctly rounded reciprocal, per mantissa),
$OUT/mean.npz (torch.mean results), $OUT/extra.safetensors and $OUT/big.safetensors.
"""
import os, sys, time, json, hashlib, traceback
import numpy as np, torch
OUT = os.environ.get('OUT', '/tmp/out')
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'pkg'))
f32 = np.float32
dev = 'cuda'
print('torch', torch.__version__, torch.cuda.get_device_name(0), 'SMs', torch.cuda.get_device_properties(0).multi_processor_count, flush=True)

def section(name, fn):
    t = time.time()
    try:
        fn()
    except Exception:
        traceback.print_exc()
    print(f'== {name} done in {time.time()-t:.1f}s', flush=True)

# ---------- 1. reciprocal table
def rcp_part():
    import cupy as cp
    src = r'''
extern "C" __global__ void k(const unsigned int* in, unsigned int* a1, unsigned int* a2, unsigned int* rn, long long n){
  long long i = blockIdx.x*(long long)blockDim.x + threadIdx.x; if (i>=n) return;
  float x = __uint_as_float(in[i]); float a, r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(a) : "f"(x));
  asm("rcp.rn.f32 %0, %1;" : "=f"(r) : "f"(x));
  a1[i] = __float_as_uint(a); a2[i] = __float_as_uint(1.0f / x); rn[i] = __float_as_uint(r);
}'''
    kfast = cp.RawKernel(src, 'k', options=('--use_fast_math',))
    n = 1 << 23
    m = cp.arange(n, dtype=cp.uint32)
    a1 = cp.empty(n, cp.uint32); a2 = cp.empty(n, cp.uint32); rn = cp.empty(n, cp.uint32)
    def run(inp):
        kfast(((n + 255) // 256,), (256,), (inp, a1, a2, rn, cp.int64(n)))
    base = (cp.uint32(127 << 23) | m)
    run(base)
    d1 = (a1.astype(cp.int64) - rn.astype(cp.int64)); d2 = (a2.astype(cp.int64) - rn.astype(cp.int64))
    print('e=127: approx-rn deltas', {int(v): int((d1 == v).sum()) for v in cp.unique(d1).get()}, 'fastmath 1/x == approx:', bool((a1 == a2).all()), flush=True)
    np.save(os.path.join(OUT, 'rcp_delta.npy'), d1.astype(cp.int8).get())
    base_a = a1.copy()
    bad = {}
    for e in range(0, 256):
        inp = (cp.uint32(e << 23) | m)
        run(inp)
        # expected: scale base result by 2^(127-e)
        be = ((base_a >> 23) & 0xff).astype(cp.int64)
        ne = be + (127 - e)
        exp_bits = cp.where(ne >= 1, (ne.astype(cp.uint32) << 23) | (base_a & 0x7fffff), cp.uint32(0))
        mism = int((exp_bits != a1).sum()) if 1 <= e <= 254 else -1
        if mism != 0:
            vals = cp.unique(a1[:4]).get()
            bad[e] = (mism, [hex(int(v)) for v in a1[:3].get()])
        # negative sign
        if e == 127:
            run(inp | cp.uint32(1 << 31))
            print('negative symmetric:', bool(((a1 ^ cp.uint32(1 << 31)) == base_a).all()))
    print('exponent scaling mismatches (e: count, sample):', bad, flush=True)
if os.environ.get('SKIP1') is None: section('rcp', rcp_part)

# ---------- 2. torch.mean order
def gen(n, seed):
    i = np.arange(n, dtype=np.uint64)
    u = (i * np.uint64(0x9E3779B1) + np.uint64(seed) * np.uint64(0x85EBCA77)) & np.uint64(0xffffffff)
    u ^= u >> np.uint64(15); u = (u * np.uint64(0x2C1B3C6D)) & np.uint64(0xffffffff); u ^= u >> np.uint64(12)
    u = u >> np.uint64(8)
    return (u.astype(f32) * f32(2.0 ** -24) * f32(4.0) + f32(0.01)).astype(f32)
def mean_part():
    lens = list(range(1, 401)) + [500, 511, 512, 513, 576, 1000, 1023, 1024, 1025, 1152, 2047, 2048, 2049, 2304, 4095, 4096, 4097, 5184, 9216, 13824, 20000, 65535, 65536, 100000, 130560, 130561, 131072, 176128, 200000, 262144, 500000, 704512, 1000000, 2000000, 4325376, 6000000]
    res = []
    for n in lens:
        for seed in (1, 2):
            x = torch.from_numpy(gen(n, seed)).to(dev)
            res.append((n, seed, float(x.mean().item())))
    arr = np.array([[r[0], r[1]] for r in res], np.int64)
    vals = np.array([r[2] for r in res], f32)
    np.savez(os.path.join(OUT, 'mean.npz'), lens=arr, vals=vals)
    print('means', len(res), flush=True)
if os.environ.get('SKIP1') is None: section('mean', mean_part)

# ---------- 3. bnb reproduces golden
def bnb_part():
    import bitsandbytes as bnb, bitsandbytes.functional as F
    from safetensors.torch import load_file, save_file
    print('bnb', bnb.__version__, flush=True)
    g = load_file('tests/golden/nf4/1.safetensors')
    cpu_map = F.create_dynamic_map()
    print('dynamic map cpu == golden:', torch.equal(cpu_map, g['w0_float32.nf4.bs64.dq.nested_code']), flush=True)
    torch.set_default_device('cuda')
    F.name2qmap.clear()
    cuda_map = F.create_dynamic_map().cpu()
    print('dynamic map cuda-default == golden:', torch.equal(cuda_map, g['w0_float32.nf4.bs64.dq.nested_code']), flush=True)
    mism = []
    total = 0
    for k in sorted(g):
        if '.' in k: continue
        A = g[k].cuda()
        for qt in ('nf4', 'fp4'):
            for bs in (64, 128):
                for mode in ('plain', 'dq'):
                    P = f'{k}.{qt}.bs{bs}.{mode}'
                    q, st = F.quantize_4bit(A, blocksize=bs, compress_statistics=(mode == 'dq'), quant_type=qt)
                    deq = F.dequantize_4bit(q, st)
                    mine = {'packed': q, 'code': st.code, 'dequant': deq}
                    if mode == 'plain':
                        mine['absmax'] = st.absmax
                    else:
                        mine.update(absmax_q=st.absmax, offset=st.offset.reshape(1), nested_absmax=st.state2.absmax, nested_code=st.state2.code)
                    for t, v in mine.items():
                        total += 1
                        if not torch.equal(v.cpu(), g[f'{P}.{t}']):
                            mism.append(f'{P}.{t}')
    print('bnb vs golden: mismatching', len(mism), 'of', total, mism[:20], flush=True)
section('bnb-golden', bnb_part)

# ---------- 4. extra cases
def extra_part():
    import bitsandbytes.functional as F
    from safetensors.torch import save_file
    torch.set_default_device('cuda')
    torch.manual_seed(1234)
    out = {}
    cases = {}
    r = lambda *s: torch.randn(*s, dtype=torch.float32)
    cases['e0_float16'] = (r(64, 64) * 0.05).half()
    cases['e1_bfloat16'] = (r(1, 63) * 0.3).bfloat16()
    cases['e2_float32'] = r(3, 1001) * 2.0
    e3 = r(4, 256) * 0.1
    e3[0] = 0
    e3[1] = r(256) * 1e-39
    e3[2, :64] = r(64) * 1e30
    e3[2, 64:128] = 0; e3[2, 64] = -3e-39
    cases['e3_bfloat16'] = e3.bfloat16()
    cases['e4_bfloat16'] = (r(300, 64) * 0.02).bfloat16()
    cases['e6_float16'] = (r(7, 9) * 3).half()
    # FP4 tie stress: per block absmax a, elements a*t for thresholds t
    nb = 1024
    a = (torch.rand(nb) * 8 + 0.01).bfloat16().float()
    ts = torch.tensor([5/6, 7/24, 5/24, 7/12, 5/12, 11/128, 1/384, 0.5, 0.25, 1/3, 2/3, 1/6, 0.75, 0.875, 0.625, 0.375])
    idx = torch.randint(0, len(ts), (nb, 63))
    sgn = torch.where(torch.rand(nb, 63) < 0.5, -1.0, 1.0)
    blk = torch.cat([a[:, None], a[:, None] * ts[idx] * sgn], 1)
    cases['e7_bfloat16'] = blk.bfloat16().reshape(nb, 64)
    cases['e7_float16'] = blk.half().reshape(nb, 64)
    cases['e7_float32'] = blk.reshape(nb, 64)
    bss = {'e0_float16': (64, 128), 'e1_bfloat16': (32, 64), 'e2_float32': (32, 256, 4096), 'e3_bfloat16': (64,), 'e4_bfloat16': (64,),
           'e5_bfloat16': (64,), 'e6_float16': (32, 64), 'e7_bfloat16': (64, 32), 'e7_float16': (64,), 'e7_float32': (64,)}
    for k, A in cases.items():
        out[k] = A.cpu().contiguous()
        for qt in ('nf4', 'fp4'):
            for bs in bss[k]:
                for mode in ('plain', 'dq'):
                    if k.startswith('e7') and bs != 64 and mode == 'dq': continue
                    P = f'{k}.{qt}.bs{bs}.{mode}'
                    q, st = F.quantize_4bit(A, blocksize=bs, compress_statistics=(mode == 'dq'), quant_type=qt)
                    out[P + '.packed'] = q
                    if mode == 'plain':
                        out[P + '.absmax'] = st.absmax
                    else:
                        out[P + '.absmax_q'] = st.absmax; out[P + '.offset'] = st.offset.reshape(1)
                        out[P + '.nested_absmax'] = st.state2.absmax
                    small = not k.startswith('e7') and k != 'e4_bfloat16'
                    for odt in ((torch.float32, torch.bfloat16, torch.float16) if small else (A.dtype,)):
                        st.dtype = odt
                        nm = {torch.float32: 'float32', torch.bfloat16: 'bfloat16', torch.float16: 'float16'}[odt]
                        out[f'{P}.dequant_{nm}'] = F.dequantize_4bit(q, st)
    out = {k: v.cpu().contiguous() for k, v in out.items()}
    save_file(out, os.path.join(OUT, 'extra.safetensors'))
    print('extra tensors', len(out), flush=True)
    # big case (global-reduce mean): inputs from gen(), not saved
    big = {}
    for n_rows, seed in ((11008, 7),):
        x = torch.from_numpy(gen(n_rows * 1024, seed)).to(dev) - 2.0
        A = x.reshape(n_rows, 1024).bfloat16()
        q, st = F.quantize_4bit(A, blocksize=64, compress_statistics=True, quant_type='nf4')
        P = f'big{seed}.nf4.bs64.dq'
        big[P + '.packed'] = q; big[P + '.absmax_q'] = st.absmax; big[P + '.offset'] = st.offset.reshape(1); big[P + '.nested_absmax'] = st.state2.absmax
        deq = F.dequantize_4bit(q, st)
        print('big dequant sha256', hashlib.sha256(deq.view(torch.int16).cpu().numpy().tobytes()).hexdigest(), deq.dtype, deq.shape, flush=True)
    save_file({k: v.cpu().contiguous() for k, v in big.items()}, os.path.join(OUT, 'big.safetensors'))
    print('big done', flush=True)
section('extra', extra_part)
