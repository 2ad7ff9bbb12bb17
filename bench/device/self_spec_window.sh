#!/usr/bin/env bash
# Issue 14's GPU window, one `device run` per phase (bench/README.md: staging):
#   smoke  carry .whl .stage/pkgs + one chunk: installs the wheels, stages the chunk, then times the
#          block engine, a random self-drafter head and a distillation step on a random-weight model
#          of Qwen2.5-Coder-1.5B's shape (bench/self_spec_smoke.py) — mechanics before the real run
#   (then one `bash bench/device/gpu_setup.sh stage` call per remaining chunk folder, back to back)
#   prep   convert both models; train the self-drafter (recipes/qwen-coder-1.5b-self-spec.yaml)
#   w4     the stock 0.5B at GPTQ W4 (int4 drafter row); the GPU tests
#   bench  every drafter row on both prompt sets (bench/self_spec_bench.py); STOCK= HF= leave out the
#          stock drafter and transformers' assisted row, TREE=default adds tree rows (several: space-separated), GPU_TESTS=files
#   long   the two best depths trained 1,500 steps (the recipe's default since), benched alone
#   deep-train  the training of `deep` alone (converts the target first), for bench/device/bg.sh
#   deep   deep-context heads (the target's final state of the previous position) at k2 and k3 beside a
#          shallow k2 trained on the same batches (shallow_layers), then benched side by side at GAMMA
#          (default 3; TREE=default adds tree rows; HEADS=k2,k3 a subset; NAME= the results file's name)
#   five-train  (bg) the run of 5's self-drafter: the recipe's deep heads (EXITS=[1,2,3] other depths) with
#          SETS (e.g. --set stages[0].steps[0].train_source=mixed), timed, into /tmp/out/self-spec-five;
#          STEPS_BUDGET=S after the teacher phase: as many steps as S seconds hold at its cached rate (3,000-9,000)
#   generations  after five-train: its greedy continuations (the generation cache's files) into $OUT; keep
#          them here in .stage/generations/ and carry that folder in a later window's first staging call
#   five-build  (bg) the stock 0.5B at GPTQ W4 (STOCK= leaves it out) and the old width-pruned self-drafter
#   five   the run of 5 (issue 14), alone on the GPU: target alone, every head at GAMMA (default 2), the
#          default head with its stop and untrimmed, stock bf16 / W4, the old self-drafter, HF assisted
#          (TREE=default adds tree rows; HF= leaves the assisted rows out, STOCK= the stock 0.5B's,
#          UNTRIMMED= the untrimmed head's, OLDSELF= the old self-drafter's; ALSO_GAMMA=3 adds the default
#          head at that draft length; REPEATS=3 times every prompt 3 times a row and keeps the median run;
#          HEADS=k0,k1 only those heads; ALSO_GAMMA is for the export's default head if listed, else the first;
#          FUSE=1 adds that head with its head step compiled whole, SelfSpecPair's fuse_head: the library's
#          default under compile on a GPU; the plain rows keep the unfused step)
#   five-more  after five: k1 drafting trees of depth 2 and 3, and the k1 / k2 rows again with k1 at γ = 3
#   teacher  exit-head training with the target run every step against the teacher cache (STEPS=200)
#   profile  the deep export's rounds under torch.profiler (bench/self_spec_profile.py): kernels and device
#          time of a draft call and a verify pass (HEAD=k3 another head, GAMMA=, NAME=)
#   draft-cost  where a draft's time goes (bench/self_spec_draft_cost.py): each part of a draft step as its own
#          CUDA graph against a target step, on random weights of the 1.5B's shape (no staging: the first call may
#          carry .whl alone), a head after block 1 (EXITS="1 0": also one after block 0, in a call of its own
#          time: each process compiles the fused parts again), and the parts compiled whole (--fused)
# Results go to /tmp/results and back as files in $OUT after every phase.
set -uo pipefail
# TREE: trees, space-separated (JSON without spaces); set -f: brackets are not globs here
TREE_ARGS=(); set -f; for t in ${TREE:-}; do TREE_ARGS+=(--tree "$t"); done; set +f
export COMPRESS_CACHE=/tmp/compress-cache PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PYTHONUNBUFFERED=1
R=/tmp/results; mkdir -p $R /tmp/out
quiet() { grep -v -e "it/s]" -e "s/it]" -e "Warning" -e "warn(" -e "^W1" -e "pytree" | cut -c1-400; }
case $1 in
  smoke)
    bash bench/device/gpu_setup.sh stage 2>&1 | tail -3
    nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader | tee $R/gpu.txt
    timeout ${T:-400} python3 bench/self_spec_smoke.py --shape qwen2.5-coder-1.5b --device cuda --compile ${SMOKE_ARGS:---hf} \
      --train-steps 10 --out $R/smoke.json 2>&1 | quiet | tail -25;;
  prep)
    bash bench/device/gpu_setup.sh stage 2>&1 | tail -2
    bash bench/device/gpu_setup.sh convert ${MODELS:-qwen2.5-coder-1.5b qwen2.5-coder-0.5b}
    timeout ${T:-500} python3 -m compress run recipes/qwen-coder-1.5b-self-spec.yaml --out /tmp/out/self-spec --force \
      ${SETS:-} 2>&1 | quiet | tail -20 | tee $R/self-spec-run.log
    cp /tmp/out/self-spec/report.json $R/self-spec-report.json 2>/dev/null
    cp /tmp/out/self-spec/self_spec.json $R/self-spec-manifest.json 2>/dev/null;;
  w4)
    timeout 200 python3 -m compress run recipes/qwen-coder-0.5b-gptq-w3g128-code.yaml --set 'stages[0].steps[0].bits=4' \
      --out /tmp/out/q05-w4 --force 2>&1 | quiet | tail -4
    cp /tmp/out/q05-w4/report.json $R/q05-w4-report.json 2>/dev/null
    timeout ${T:-300} python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tail -8 | tee $R/gpu-tests.txt;;
  bench)
    W4=""; [ -d /tmp/out/q05-w4 ] && W4="--stock-w4 /tmp/out/q05-w4"
    timeout ${T:-560} python3 bench/self_spec_bench.py --target qwen2.5-coder-1.5b ${STOCK---stock qwen2.5-coder-0.5b} $W4 \
      --self-spec /tmp/out/self-spec ${HEADS:+--heads $HEADS} --prompts bench/draft_bench_prompts/code.txt \
      bench/draft_bench_prompts/prose.txt --gamma ${GAMMA:-4} --device cuda --dtype bfloat16 --compile \
      ${HF---hf-assisted} "${TREE_ARGS[@]}" --out $R/self-spec-bench.json 2>&1 | quiet | tail -40
    [ -z "${GPU_TESTS:-}" ] || timeout 200 python3 -m pytest -q -m gpu $GPU_TESTS -p no:cacheprovider 2>&1 | tail -4 | tee $R/gpu-tests.txt;;
  long)
    timeout 230 python3 -m compress run recipes/qwen-coder-1.5b-self-spec.yaml --out /tmp/out/self-spec-long --force \
      --quiet --set 'stages[0].steps[0].exit_layers=[2,3]' --set 'stages[0].steps[0].full_vocab_layers=[]' \
      --set 'stages[0].steps[0].steps=1500' 2>&1 | quiet | tail -4
    cp /tmp/out/self-spec-long/self_spec.json $R/long-manifest.json
    timeout 170 python3 bench/self_spec_bench.py --target qwen2.5-coder-1.5b --self-spec /tmp/out/self-spec-long \
      --prompts bench/draft_bench_prompts/code.txt bench/draft_bench_prompts/prose.txt --gamma ${GAMMA:-4} \
      --device cuda --dtype bfloat16 --compile --out $R/long-bench.json 2>&1 | grep "^\[";;
  deep-train|deep)
    [ -f /tmp/out/self-spec-deep/self_spec.json ] || { bash bench/device/gpu_setup.sh convert qwen2.5-coder-1.5b
      timeout ${TT:-900} python3 -m compress run recipes/qwen-coder-1.5b-self-spec.yaml \
      --out /tmp/out/self-spec-deep --force --quiet --set 'stages[0].steps[0].context=deep' \
      --set 'stages[0].steps[0].exit_layers=[2,3]' --set 'stages[0].steps[0].shallow_layers=[2]' \
      --set 'stages[0].steps[0].full_vocab_layers=[]' ${SETS:-} 2>&1 | quiet | tail -4; }
    cp /tmp/out/self-spec-deep/self_spec.json $R/deep-manifest.json
    cp /tmp/out/self-spec-deep/report.json $R/deep-report.json
    [ $1 = deep ] && timeout ${T:-560} python3 bench/self_spec_bench.py --target qwen2.5-coder-1.5b --self-spec /tmp/out/self-spec-deep \
      ${HEADS:+--heads $HEADS} --prompts bench/draft_bench_prompts/code.txt bench/draft_bench_prompts/prose.txt --gamma ${GAMMA:-3} \
      --device cuda --dtype bfloat16 --compile "${TREE_ARGS[@]}" --out $R/${NAME:-deep-bench}.json 2>&1 | grep "^\[";;
  five-train)
    bash bench/device/gpu_setup.sh convert qwen2.5-coder-1.5b
    STEPS_SET=""
    if [ -n "${STEPS_BUDGET:-}" ] && [ -f $R/teacher-cache.json ]; then  # as many steps as STEPS_BUDGET seconds hold at
      # the teacher phase's cached rate (its two heads), 3,000 to 9,000 in hundreds
      n=$(python3 -c "import json; r = json.load(open('$R/teacher-cache.json'))['runs']['auto']['steps_per_s']; \
print(max(3000, min(9000, int($STEPS_BUDGET * r) // 100 * 100)))")
      STEPS_SET="--set stages[0].steps[0].steps=$n"; echo "five-train: $n steps (STEPS_BUDGET=$STEPS_BUDGET s)" | tee $R/five-steps.txt
    fi
    t0=$(date +%s)
    timeout ${TT:-900} python3 -m compress run recipes/qwen-coder-1.5b-self-spec.yaml --out /tmp/out/self-spec-five \
      --force ${EXITS:+--set "stages[0].steps[0].exit_layers=$EXITS"} ${SETS:-} $STEPS_SET 2>&1 | quiet | tail -12
    echo "five-train: $(( $(date +%s) - t0 )) s (the recipe run: generation, training, curve, calibrator, export)" \
      | tee $R/five-train-seconds.txt
    cp /tmp/out/self-spec-five/self_spec.json $R/five-manifest.json
    cp /tmp/out/self-spec-five/report.json $R/five-report.json
    python3 -c "import json; t = json.load(open('$R/five-report.json'))['stages'][0]['steps'][0]['training']
for p in t.get('learning_curve', []):  # held-out and training agreement as the heads trained
    print('step', p['step'], *(f\"{s} {k} {v['greedy_agreement']:.3f}\" for s in ('held_out', 'train') for k, v in p[s].items()))
" | tee $R/five-learning-curve.txt;;
  generations)  # after five-train, in a call of its own (a call brings back at most 8 files): the greedy
    # continuations the recipe made, to keep here in .stage/generations/ for a later window's staging
    ls -la $COMPRESS_CACHE/generations/; cp $COMPRESS_CACHE/generations/*.safetensors "$OUT"/; exit 0;;
  five-build)
    [ -n "${STOCK-x}" ] && { bash bench/device/gpu_setup.sh convert qwen2.5-coder-0.5b
    timeout 300 python3 -m compress run recipes/qwen-coder-0.5b-gptq-w3g128-code.yaml --set 'stages[0].steps[0].bits=4' \
      --out /tmp/out/q05-w4 --force --quiet 2>&1 | quiet | tail -3
    cp /tmp/out/q05-w4/report.json $R/five-q05-w4-report.json; }
    timeout 600 python3 -m compress run recipes/qwen-coder-1.5b-self-drafter.yaml --out /tmp/out/old-self --force \
      --quiet 2>&1 | quiet | tail -3
    cp /tmp/out/old-self/report.json $R/five-old-self-report.json;;
  five)
    OLD=""; [ -n "${OLDSELF-x}" ] && [ -d /tmp/out/old-self ] && OLD="--old-self /tmp/out/old-self"
    W4=""; [ -n "${STOCK-x}" ] && [ -d /tmp/out/q05-w4 ] && W4="--stock-w4 /tmp/out/q05-w4"
    timeout ${T:-580} python3 bench/self_spec_bench.py --target qwen2.5-coder-1.5b ${STOCK---stock qwen2.5-coder-0.5b} $W4 $OLD \
      --self-spec /tmp/out/self-spec-five ${UNTRIMMED---untrimmed} --prompts bench/draft_bench_prompts/code.txt \
      bench/draft_bench_prompts/prose.txt --gamma ${GAMMA:-2} --device cuda --dtype bfloat16 --compile \
      ${HF---hf-assisted} "${TREE_ARGS[@]}" ${HEADS:+--heads $HEADS} ${ALSO_GAMMA:+--also-gamma $ALSO_GAMMA} ${REPEATS:+--repeats $REPEATS} \
      ${FUSE:+--fuse-head} --out $R/${NAME:-five-bench}.json 2>&1 \
      | grep -e "^\[" -e Error | cut -c1-300;;
  five-more)  # after `five`, two more processes on the same exports: trees of depth 2 and 3 for k1, and
    # a repeat of the k1 / k2 rows with k1 at γ 3 (the spread between processes; five-c's README)
    timeout 300 python3 bench/self_spec_bench.py --target qwen2.5-coder-1.5b --self-spec /tmp/out/self-spec-five --heads k1 \
      --prompts bench/draft_bench_prompts/code.txt bench/draft_bench_prompts/prose.txt --gamma 2 --device cuda --dtype bfloat16 \
      --compile --tree '[[0],[1],[2],[0,0],[0,1],[1,0]]' --tree '[[0],[1],[2],[0,0],[0,1],[1,0],[0,0,0],[0,0,1],[0,1,0]]' \
      --out $R/five-tree-3.json 2>&1 | grep -e "^\[" -e Error | cut -c1-250
    timeout 200 python3 bench/self_spec_bench.py --target qwen2.5-coder-1.5b --self-spec /tmp/out/self-spec-five --heads k1,k2 \
      --prompts bench/draft_bench_prompts/code.txt bench/draft_bench_prompts/prose.txt --gamma 2 --also-gamma 3 --device cuda \
      --dtype bfloat16 --compile --out $R/five-repeat-3.json 2>&1 | grep -e "^\[" -e Error | cut -c1-250;;
  teacher)  # exit-head training with the target every step against the teacher cache, side by side
    # (bench/self_spec_teacher.py); converts the staged 1.5B first where no phase has
    bash bench/device/gpu_setup.sh convert qwen2.5-coder-1.5b
    timeout ${T:-300} python3 bench/self_spec_teacher.py --model qwen2.5-coder-1.5b --device cuda --dtype bfloat16 \
      --seq-len 512 --train-windows 1024 --batch-size 16 --steps ${STEPS:-200} --exit-layer 1 --mid-depth 14 \
      --vocab-size 32768 --out $R/teacher-cache.json 2>&1 | quiet | tail -4;;
  profile)
    timeout ${T:-300} python3 bench/self_spec_profile.py --target qwen2.5-coder-1.5b --self-spec /tmp/out/self-spec-deep \
      ${HEAD:+--head $HEAD} --prompts bench/draft_bench_prompts/code.txt --max-prompts 2 --gamma ${GAMMA:-2} \
      --device cuda --compile --out $R/${NAME:-profile}.json 2>&1 | quiet | tail -6;;
  draft-cost)
    bash bench/device/gpu_setup.sh install 2>&1 | tail -1
    for k in ${EXITS:-1}; do
      timeout ${T:-450} python3 bench/self_spec_draft_cost.py --target random:qwen2.5-coder-1.5b --exit-layer $k \
        --gamma ${GAMMA:-3} --device cuda --compile --fused --out $R/draft-cost-random-k$k.json 2>&1 | quiet | tail -18
    done;;
  *) echo "usage: self_spec_window.sh smoke|prep|w4|bench|long|deep-train|deep|five-train|five-build|five|five-more|generations|teacher|profile|draft-cost" >&2; exit 2;;
esac
[ -z "${OUT:-}" ] || { cp $R/*.json $R/*.txt $R/*.log "$OUT"/ 2>/dev/null; ls "$OUT"; }
