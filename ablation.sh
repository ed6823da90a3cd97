#!/usr/bin/env bash
# Ablation ladder from the bug to the fix, one change per rung, then one comparison:
#   bug            everything but BN frozen, 1024 px, batch 4, lr 0.01
#   unfreeze-only  nothing frozen, same 1024 px / batch 4 / lr 0.01
#   unfreeze-224px nothing frozen, 224 px, batch 4 / lr 0.01
#   fixed          nothing frozen, 224 px, batch 64, lr 0.005
# Every argument goes to every training run (but those a rung sets itself: --run-name,
# --image-size, --batch-size, --lr), e.g. a check on the CPU that the ladder runs end to
# end (1.5 minutes on 2 cores, 2026-12-03: two rungs are 1024 px, whatever the flags):
#   ./ablation.sh --dummy --device cpu --no-pretrained --epochs 1 \
#       --limit-train-batches 1 --limit-eval-batches 1
# Results land in --output-dir (default results, relative to the current directory, as
# for the training scripts); the table is printed and the figure is OUTPUT_DIR/ablation.png.
# Set PYTHON to pick the interpreter.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

for arg in "$@"; do  # the header above is the help; the scripts' own: python fixed.py --help
    if [[ $arg == -h || $arg == --help ]]; then
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        exit 0
    fi
done
python="${PYTHON:-python}"

# Find --output-dir the way argparse will (last one wins) so compare.py reads the same files.
output_dir=results
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --output-dir)
            if ((i + 1 >= ${#args[@]})); then
                echo "ablation.sh: error: --output-dir needs a value" >&2
                exit 2
            fi
            output_dir="${args[i + 1]}" ;;
        --output-dir=*) output_dir="${args[i]#--output-dir=}" ;;
        # Each rung sets its own name and recipe: a flag given here would come last on every
        # rung's command line, win, and collapse the ladder.
        --run-name | --run-name=* | --image-size | --image-size=* | --batch-size | \
            --batch-size=* | --lr | --lr=*)
            echo "ablation.sh: error: ${args[i]%%=*} is set per rung; leave it out" >&2
            exit 2 ;;
    esac
done

# The user's flags for rung $1, but --resume only where that rung has a checkpoint: an
# interrupted ladder, resumed, finishes its started rungs and starts the others.
rung_flags() {
    flags=()
    local arg
    for arg in ${args[@]+"${args[@]}"}; do
        if [[ $arg != --resume || -e "$output_dir/$1.pth" ]]; then
            flags+=("$arg")
        fi
    done
}

rung_flags bug
"$python" "$here/bug.py" --run-name bug ${flags[@]+"${flags[@]}"}
rung_flags unfreeze-only
"$python" "$here/fixed.py" --run-name unfreeze-only --image-size 1024 --batch-size 4 --lr 0.01 \
    ${flags[@]+"${flags[@]}"}
rung_flags unfreeze-224px
"$python" "$here/fixed.py" --run-name unfreeze-224px --batch-size 4 --lr 0.01 ${flags[@]+"${flags[@]}"}
rung_flags fixed
"$python" "$here/fixed.py" --run-name fixed ${flags[@]+"${flags[@]}"}

"$python" "$here/compare.py" "$output_dir/bug.json" "$output_dir/unfreeze-only.json" \
    "$output_dir/unfreeze-224px.json" "$output_dir/fixed.json" --plot "$output_dir/ablation.png"
