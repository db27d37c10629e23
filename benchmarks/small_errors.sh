#!/bin/bash
# The four small errors of issue 27 (and three kin), each applied to a clean copy of HEAD (a git worktree): runs the
# default-suite tests about that function and says whether `make test` catches it. Needs a committed HEAD and .venv.
#   bash benchmarks/small_errors.sh | tee benchmarks/results/small_errors.md
set -u
ROOT=$(git rev-parse --show-toplevel); cd "$ROOT"; INJ=$(mktemp -d)/inj
git worktree add -f "$INJ" HEAD -q
run() {  # name file sed-expression tests...
  local name=$1 file=$2 expr=$3; shift 3
  (cd "$INJ" && git checkout -q -- . && sed -i "$expr" "$file" && ! git diff --quiet) || { echo "$name: PATCH DID NOT APPLY"; return; }
  if (cd "$INJ" && PYTHONPATH="$INJ/src" OMP_NUM_THREADS=1 timeout 600 "$ROOT/.venv/bin/python" -m pytest -q -x -p no:warnings -p no:cacheprovider "$@" > "$INJ.log" 2>&1); then
    echo "$name: MISSED (all of $* pass)"
  else
    echo "$name: caught by $(grep -m1 -oE '^FAILED [^ ]+' "$INJ.log")"
  fi
}
run "negated cosine" src/proreflow/losses.py 's/    return torch.nn.functional.cosine_similarity(p, q, dim=1, eps=eps)/    return -torch.nn.functional.cosine_similarity(p, q, dim=1, eps=eps)/' tests/test_references.py tests/test_loss_weighting.py tests/test_algorithm.py
run "sign flip in the v-prediction conversion" src/proreflow/conventions.py 's/        return a \* x_tau - s \* output, s \* x_tau + a \* output/        return a * x_tau - s * output, s * x_tau - a * output/' tests/test_references.py tests/test_diffusers_vp.py
run "sign flip in the eps conversion" src/proreflow/conventions.py 's/        return (x_tau - s \* eps) \/ a, eps/        return (x_tau + s * eps) \/ a, eps/' tests/test_references.py tests/test_diffusers_vp.py
run "timestep-placed windows one timestep off" src/proreflow/fields/vp.py 's/u \* T - 1.0/u * T - 2.0/' tests/test_window_placement.py tests/test_ddim_equivalence.py
run "flow-placed windows one timestep off" src/proreflow/windows.py 's|        return cls(tuple(1.0 - i / num_windows for i in range(num_windows + 1)))|        return cls((1.0, *(1.0 - i / num_windows + 1e-3 for i in range(1, num_windows)), 0.0))|' tests/test_window_placement.py tests/test_algorithm.py
run "first step fed 1.066x noise" src/proreflow/fields/vp.py 's/        return NoiseEntry(t=self.t_max, scale=float(1.0 \/ self.scale(top)))/        return NoiseEntry(t=self.t_max, scale=1.0)/' tests/test_ddim_equivalence.py tests/test_diffusers_vp.py tests/test_evaluate.py
run "exported scheduler's init_noise_sigma 1.066" src/proreflow/schedulers/proreflow.py 's/        self.init_noise_sigma = 1.0  # x_999 = eps/        self.init_noise_sigma = 1.066  # x_999 = eps/' tests/test_diffusers_vp.py tests/test_evaluate.py tests/test_ddim_equivalence.py
cd "$ROOT" && git worktree remove --force "$INJ"
