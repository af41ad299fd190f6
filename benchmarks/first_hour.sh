#!/usr/bin/env bash
# A newcomer's first hour, timed: a fresh clone of this checkout's HEAD, the README's set-up
# command (install, then the main job), then its quick start, verbatim, step by step. Prints a
# Markdown table of each step's wall time (and the wheels pip fetched), for
# results/benchmarks/first_hour.md; leaves the clone in $1 (default: a new temporary folder), so
# that its quick-start outputs can become results/examples/elpv-quick/.
#
#   bash benchmarks/first_hour.sh [CLONE_DIR] > results/benchmarks/first_hour.md
set -euo pipefail
source_repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
clone=${1:-$(mktemp -d)/defect-tune}
git clone -q "$source_repo" "$clone"
cd "$clone"
log=$(mktemp)

step() {  # label, then the command as the README writes it
  local label=$1 command=$2 start end
  start=$(date +%s)
  bash -c "$command" >>"$log" 2>&1 || { echo "failed: $command (log: $log)" >&2; exit 1; }
  end=$(date +%s)
  printf '| %s | `%s` | %dm%02ds |\n' "$label" "$command" $(((end - start) / 60)) $(((end - start) % 60))
}

echo "# A newcomer's first hour: set-up and quick start, timed"
echo
echo "\`benchmarks/first_hour.sh\` on $(git log -1 --format='%h (%cs)'), $(nproc) cores, no GPU, $(date -u +%F);"
echo "a fresh clone, the README's commands as written, nothing else running."
echo
echo "| step | command | wall time |"
echo "|---|---|---:|"
step "install (set-up)" "python3 -m venv .venv && .venv/bin/pip install -e '.[weights]'"
step "main job (set-up)" ".venv/bin/defect-tune search"
step "0. ELPV images" "source .venv/bin/activate && pip install -e '.[elpv]'"
# The quick start's own lines, from the README of this clone.
python3 - <<'EOF' >"$log.commands"
import re
text = open("README.md").read().split("## Quick start", 1)[1]
block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
print("\n".join([line for line in block.splitlines() if line.strip() and not line.startswith("#")][1:]))
EOF
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"  # what step 0's `source` did
n=1
while IFS= read -r command; do
  step "$n. quick start" "$command"
  n=$((n + 1))
done <"$log.commands"
echo
fetched=$(grep -o 'Downloading [^ ]* ([0-9.]* [kMG]B)' "$log" | awk '{v=$3; u=$4; gsub(/[()]/,"",v); gsub(/[()]/,"",u); v=(u=="kB")?v/1000:(u=="GB")?v*1000:v; s+=v} END {printf "%.0f", s}')
local_wheels=$(grep -o 'Processing /[^ ]*\.whl' "$log" | awk '{print $2}' | xargs -r du -cm 2>/dev/null | tail -1 | cut -f1)
echo "pip fetched ${fetched:-0} MB of wheels from the package index and read ${local_wheels:-0} MB from local wheel"
echo "files; the virtual environment takes $(du -sh .venv | cut -f1) on disk."
echo
echo "The clone, with the quick start's outputs: $clone"
