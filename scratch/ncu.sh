set -u
SEC="--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section SourceCounters"
for s in 0.0 0.5; do
  echo "##### sparsity $s default config"
  timeout 120 ncu --kernel-name regex:_sparse_gemv --launch-skip 3 --launch-count 1 $SEC python3 scratch/one.py $s 4096 14336 2>&1 | grep -v -E "^==PROF==|Warning" | head -150
done
echo "##### sparsity 0.5 BN1024 BK16 split16"
timeout 120 ncu --kernel-name regex:_sparse_gemv --launch-skip 3 --launch-count 1 --section SpeedOfLight --section WarpStateStats --section Occupancy python3 scratch/one.py 0.5 4096 14336 '{"BLOCK_B":1,"BLOCK_K":16,"BLOCK_N":1024,"SPLIT_K":16,"num_warps":4,"num_stages":1}' 2>&1 | grep -v -E "^==PROF==|Warning" | head -100
