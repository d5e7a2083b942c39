import sys, subprocess, os
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, os.path.dirname(__file__))
from exp_kernels import gemv_b1 as k
P = os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin')
sig = {'x_ptr':'*bf16','w_ptr':'*bf16','thr_ptr':'*fp32','idx_ptr':'*i32','out_ptr':'*fp32','K':'i32','N':'i32','K_PER_SPLIT':'i32',
       'MODE':'constexpr','BLOCK_K':'constexpr','BLOCK_N':'constexpr','CHUNK':'constexpr','STAGES':'constexpr','M':'constexpr'}
for mode, bk, bn, st, m, nw in [tuple(map(int, a.split(','))) for a in sys.argv[1:]]:
    const = dict(MODE=mode, BLOCK_K=bk, BLOCK_N=bn, CHUNK=1024, STAGES=st, M=m)
    src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(n),): v for n, v in const.items()}, attrs={(k.arg_names.index(n),): [['tt.divisibility', 16]] for n in ['x_ptr','w_ptr','thr_ptr','idx_ptr','out_ptr','K','N','K_PER_SPLIT']})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw))
    open('/tmp/v.ptx','w').write(c.asm['ptx'])
    r = subprocess.run([P+'/ptxas','-arch=sm_90a','-v','/tmp/v.ptx','-o','/tmp/v.cubin'],capture_output=True,text=True).stderr
    regs = [l for l in r.splitlines() if 'registers' in l or 'spill' in l]
    tt = c.asm['ttgir']
    print(const, nw, 'shared', c.metadata.shared, 'async', tt.count('async_copy_global_to_local'), 'wgmma', tt.count('warp_group_dot'), 'wbuf', [l.split('memdesc<')[1].split(',')[0] for l in tt.splitlines() if 'local_alloc' in l and 'bf16' in l], '|', ' '.join(x.strip() for x in regs))
