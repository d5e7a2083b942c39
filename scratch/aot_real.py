import sys, subprocess, os
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, '/work/main')
from sparse_ops.gemv import _sparse_gemv_kernel as k
P = os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin')
sig = {'x_ptr':'*bf16','wa_ptr':'*bf16','wb_ptr':'*bf16','scale_ptr':'*fp32','thr_ptr':'*fp32','idx_ptr':'*i32','out_ptr':'*fp32',
 'B':'i32','K':'i32','N':'i32','N_A':'i32','SEG1':'i32','SEG2':'i32','K_PER_SPLIT':'i32',
 'HAS_SCALE':'constexpr','USE_DOT':'constexpr','DOT_F32':'constexpr','BLOCK_B':'constexpr','BLOCK_K':'constexpr','BLOCK_N':'constexpr','CHUNK':'constexpr'}
div = ['x_ptr','wa_ptr','wb_ptr','scale_ptr','thr_ptr','idx_ptr','out_ptr','K','N','N_A','SEG1','SEG2','K_PER_SPLIT']
for st in (3, 1):
    const = dict(HAS_SCALE=False, USE_DOT=False, DOT_F32=False, BLOCK_B=1, BLOCK_K=128, BLOCK_N=128, CHUNK=1024)
    src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(n),): v for n, v in const.items()},
                    attrs={(k.arg_names.index(n),): [['tt.divisibility', 16]] for n in div})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=st))
    open('/tmp/v.ptx','w').write(c.asm['ptx'])
    r = subprocess.run([P+'/ptxas','-arch=sm_90a','-v','/tmp/v.ptx','-o','/tmp/v.cubin'],capture_output=True,text=True).stderr
    print(st, 'shared', c.metadata.shared, 'async', c.asm['ttgir'].count('async_copy_global_to_local'), [l.strip() for l in r.splitlines() if 'registers' in l])
