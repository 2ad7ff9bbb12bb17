#!/usr/bin/env bash
# Issue 17 part 5 on the H200: streaming GPTQ W4 g128 at real shapes (bench/scale_gptq.py), in phases,
# one `device run` call each (10-minute limit per call, 64 GB disk, /tmp kept only while the machine
# stays warm: run the phases back to back).
#   bash bench/device/scale_window.sh PHASE
# Every call carries .whl (the wheels the GPU image lacks: `bash bench/device/prepare.sh smollm2-135m`
# writes it here; 3.7 MiB) and starts with `setup` implicitly. Results: /tmp/results/scale-*.json, and
# every phase copies them to $OUT (they come back; commit them into bench/results/scale/).
#
# Phases, in order (disk used after each):
#   write8b     the Llama-3.1-8B-shaped checkpoint, bf16, 33 shards (16 GB)
#   ours8b      streaming GPTQ on it (+5.7 GB export), as GPTQModel runs: no finished blocks kept for a resume
#               (77.6 s on 2026-12-03, ninth session: one call holds it). RESUME=1 keeps them (+16 GB; each block written twice):
#               a call cut off then continues at the first block not written when ours8b runs again
#   peer8b      GPTQModel 7.6 on the same folder, its own process (if gptqmodel imports there)
#   write14b    drops the 8B files, writes the Qwen2.5-14B shape (30 GB)
#   ours14b     streaming GPTQ, no resume (30 + 10 GB export: blocks kept for resume would not fit)
#   cap14b      the same with the GPU capped at 0.15 x 141 GB = 21 GB, below the model's 30 GB
#   profile8b   3 blocks of the 8B shape (generated, nothing on disk) under cProfile with CUDA_LAUNCH_BLOCKING=1:
#               where a block's seconds go (profile-8b.txt); needs no earlier phase
#   ours70b     the 70B shape generated from the seed per block, on the GPU (nothing written but the export);
#               LAYERS70 of its 80 blocks at full width (default 16: 80 do not fit one 10-minute call;
#               per-block time and the peaks are what the layer count does not change). All 80:
#               LAYERS70=80 PHASE_TIMEOUT=1700 bash bench/device/bg.sh start b70 "bash bench/device/scale_window.sh ours70b"
#               in a hold of its own (no resume: 80 finished blocks, 136 GB, would not fit the disk); drops the 8B
#               and 14B folders first
#   host8b      write8b and ours8b, then the streaming GPU tests: the host-memory changes made after the ninth
#               session (first shard written a slice at a time, the embedding kept on the GPU), ~4 min. The tests
#               read the BBC corpus: carry .stage/pkgs once before (`bash bench/device/gpu_setup.sh stage`)
#   chain       write8b, ours8b, peer8b, then ours70b at 80 blocks, one after another, under bg.sh (17 min on
#               2026-12-03: 73 + 78 + 198 + 645 s; bench/results/scale/h200-2026-12-03-chain/)
# Calibration: N x L random token ids (default 128 x 2048; N=32 L=2048 if a phase does not fit).
set -uo pipefail
# the cache gpu_setup.sh stages into: the GPU tests of host8b calibrate on the BBC corpus (.stage/pkgs)
export COMPRESS_CACHE=${COMPRESS_CACHE:-/tmp/compress-cache} PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
  TOKENIZERS_PARALLELISM=false
R=/tmp/results; S=/tmp/scale; mkdir -p $R $S
N=${N:-128} L=${L:-2048} T=${PHASE_TIMEOUT:-560} LAYERS70=${LAYERS70:-16}
[ -d /tmp/site/pydantic ] || bash bench/device/gpu_setup.sh install >/dev/null 2>&1 || echo "setup: wheels not installed (carry .whl)"
run() {  # run NAME ARGS...: bench/scale_gptq.py run into $R/scale-NAME.json
  local name=$1; shift
  timeout $T python3 bench/scale_gptq.py run --device cuda --samples $N --seq-len $L --out $R/scale-$name.json "$@" \
    2>&1 | grep -v "it/s" | tail -12 | cut -c1-400
}
case ${1:-} in
  write8b)  timeout $T python3 bench/scale_gptq.py write --shape llama-3.1-8b --dir $S/8b --out $R/write-8b.json | tail -8;;
  ours8b)   run 8b-ours${RESUME:+-resume} --shape llama-3.1-8b --dir $S/8b --export-dir $S/8b-gptq ${RESUME:+--resume};;
  peer8b)   rm -rf $S/8b-gptq  # our export: room for the peer's
            python3 -c "import gptqmodel" 2>/dev/null && run 8b-gptqmodel --shape llama-3.1-8b --dir $S/8b \
              --export-dir $S/8b-gptqmodel --peer gptqmodel || echo "peer8b: gptqmodel does not import here";;
  write14b) rm -rf $S/8b $S/8b-gptq $S/8b-gptqmodel
            timeout $T python3 bench/scale_gptq.py write --shape qwen2.5-14b --dir $S/14b --out $R/write-14b.json | tail -8;;
  ours14b)  run 14b-ours --shape qwen2.5-14b --dir $S/14b --export-dir $S/14b-gptq;;
  cap14b)   run 14b-cap --shape qwen2.5-14b --dir $S/14b --export-dir $S/14b-gptq --gpu-fraction 0.15;;
  profile8b) # where a block's time goes: LAYERS8 (default 3) blocks of the 8B shape generated from the seed, under
            # cProfile with CUDA_LAUNCH_BLOCKING=1 (each launch waits for its kernel, so host time is device time)
            CUDA_LAUNCH_BLOCKING=1 timeout $T python3 -m cProfile -o $R/profile-8b.prof bench/scale_gptq.py run \
              --device cuda --samples $N --seq-len $L --shape llama-3.1-8b --generate --generate-device cuda \
              --layers ${LAYERS8:-3} --dir $S/g8 \
              --export-dir $S/g8-gptq --out $R/scale-8b-profile.json 2>&1 | grep -v "it/s" | tail -3
            python3 -c "import pstats,sys; s=pstats.Stats('$R/profile-8b.prof', stream=sys.stdout)
s.sort_stats('cumulative').print_stats('compress/', 45); s.sort_stats('tottime').print_stats(30)" \
              | cut -c1-200 > $R/profile-8b.txt; grep -A47 "ncalls" $R/profile-8b.txt | head -48; rm -rf $S/g8-gptq;;
  ours70b)  rm -rf $S/8b $S/8b-gptq $S/8b-gptqmodel $S/14b $S/14b-gptq  # its ~38 GB export needs the room
            run 70b-ours --shape llama-3.1-70b --generate --generate-device cuda --layers $LAYERS70 --dir $S/70b \
              --export-dir $S/70b-gptq;;
  host8b)   for p in write8b ours8b; do echo "== $p"; bash "$0" $p; done
            timeout $T python3 -m pytest -q -m gpu tests/test_stream.py 2>&1 | tail -3 | tee $R/host8b-gpu-tests.txt;;
  chain)    # the next window's whole run as one background job, phases one after another (nothing timed overlaps):
            # bash bench/device/bg.sh start chain "bash bench/device/scale_window.sh chain"; then `bg.sh wait chain`
            # calls, and a last call copies /tmp/results/*.json to $OUT
            for p in write8b ours8b peer8b; do echo "== $p"; bash "$0" $p; done
            echo "== ours70b, 80 blocks"; LAYERS70=80 PHASE_TIMEOUT=1700 bash "$0" ours70b;;
  *) sed -n 2,31p "$0" >&2; exit 2;;
esac
df -h /tmp | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $R/gpu.txt 2>/dev/null
[ -n "${OUT:-}" ] && cp $R/*.json $R/*.txt "$OUT"/ 2>/dev/null
true
