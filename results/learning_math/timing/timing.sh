#!/bin/bash
# idle-machine wall-clock of the comparison's seed-0 SPEAR and Dr.BoT runs, same commit and flags
cd /work/wt-cmp
for arm in ${ARMS:-spear drbot}; do
  rm -rf runs/timing-$arm-s0
  s=$(date +%s.%N)
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TQDM_DISABLE=1 /work/venv/bin/python train.py --env math --model smollm2-135m --seed 0 --steps 14 \
     --eval_every 7 --ckpt_every 7 --resume auto --run_name timing-$arm-s0 --algo $arm
  e=$(date +%s.%N)
  echo "TIMING $arm $(echo "$e - $s" | bc)"
done
