#!/usr/bin/env bash
# Compile-only check of the CUDA sources (no GPU needed, nothing is linked or run).
#
# CI has nvcc but a CPU build of torch, so setup.py never builds rope_cuda.cu there
# (it needs torch.version.cuda). This script compiles, with `nvcc -c`, for
# sm_80 and sm_90:
#   1. csrc/rope_cuda.cu, the launcher, against the torch headers with the flags
#      torch's BuildExtension/CUDAExtension + our setup.py pass to nvcc;
#   2. csrc/tests/rope_cuda_standalone.cu, which includes only
#      dpe/rope_cuda.cuh (no torch) and instantiates its entry points
#      dpe::rope_cuda / dpe::rope_and_cache_cuda (every kernel: float/__half/
#      __nv_bfloat16 x int32/int64 positions x neox/gptj).
# Then it checks each object holds SASS for every arch, and that the kernel's
# PTX has no sin.approx/cos.approx (the header promises accurate sincosf).
#
# rope_cuda.cu includes only c10/cuda stream/guard headers (not ATen/cuda/
# CUDAContext.h, which pulls in cuBLAS/cuSPARSE/cuSOLVER headers that a bare
# nvcc install lacks). The torch CPU wheel lacks one generated header,
# c10/cuda/impl/cuda_cmake_macros.h. Its only content is
#     `#define C10_CUDA_BUILD_SHARED_LIBS`, read only under _WIN32, so
#     -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE (torch's own switch to skip it) is
#     exactly equivalent on Linux. Added only when the header is missing.
#
# Environment:
#   PYTHON                 python with torch (default: python3)
#   NVCC                   nvcc (default: nvcc on PATH)
#   DPE_CUDA_ARCHS         space-separated SM numbers (default: "80 90")
#   DPE_CUDA_STD           C++ standard of the rope_cuda.cu compile (default: c++20,
#                          what torch 2.13's BuildExtension adds when setup.py
#                          passes no -std, as now)
#   DPE_CUDA_KERNEL_STD    C++ standard of the torch-free kernel TU (default:
#                          c++17, the oldest the header is meant to support)
#   DPE_CUDA_OBJDIR        keep objects and logs here (default: temp dir, removed)
#   DPE_CUDA_STRICT=1      fail on compiler warnings and on missing SASS too
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PYTHON=${PYTHON:-python3}
NVCC=${NVCC:-nvcc}
read -r -a ARCHS <<<"${DPE_CUDA_ARCHS:-80 90}"
CXX_STD=${DPE_CUDA_STD:-c++20}
KERNEL_STD=${DPE_CUDA_KERNEL_STD:-c++17}
STRICT=${DPE_CUDA_STRICT:-0}
# Header-only use; these are what cuda-toolkit==13.0.3.0 pins for CUDA 13.0.

SECONDS=0
log() { printf '[compile_cuda] %s\n' "$*"; }
warn() { printf '[compile_cuda] WARNING: %s\n' "$*"; }
die() {
  printf '[compile_cuda] FAIL: %s\n' "$*" >&2
  exit 1
}

command -v "$NVCC" >/dev/null || die "nvcc not found (NVCC=$NVCC)"
command -v "$PYTHON" >/dev/null || die "python not found (PYTHON=$PYTHON)"

if [[ -n ${DPE_CUDA_OBJDIR:-} ]]; then
  OUT=$DPE_CUDA_OBJDIR
  mkdir -p "$OUT"
else
  OUT=$(mktemp -d "${TMPDIR:-/tmp}/dpe_compile_cuda.XXXXXX")
  trap 'rm -rf "$OUT"' EXIT
fi

log "nvcc: $("$NVCC" --version | grep -E '^Cuda compilation tools' || echo '?')"
log "archs: ${ARCHS[*]/#/sm_}; objects in $OUT"

GENCODE=()
for a in "${ARCHS[@]}"; do GENCODE+=(-gencode "arch=compute_${a},code=sm_${a}"); done

# Flags shared by both translation units (each adds its -std). -O3 and
# -lineinfo as setup.py; never --use_fast_math (rope.h: angles need
# full-range sincosf).
COMMON=(-c -O3 -lineinfo --expt-relaxed-constexpr
  -Icsrc -Icsrc/include
  -Xcompiler -fPIC -Xcompiler -Wall -Xcompiler -Wextra
  -Xptxas -v -Xptxas -warn-spills)

# ---------------------------------------------------------------------------
# torch: include dirs, ABI. include_paths() takes device_type= since torch 2.6
# (cuda= before). "cpu" on purpose: "cuda" only appends $CUDA_HOME/include
# (nvcc adds its own) and raises OSError on a CPU build, where CUDA_HOME is None.
TORCH_INFO=$("$PYTHON" - <<'EOF'
import inspect
import torch
from torch.utils import cpp_extension as ce

params = inspect.signature(ce.include_paths).parameters
if "device_type" in params:
    paths = ce.include_paths(device_type="cpu")
elif "cuda" in params:
    paths = ce.include_paths(cuda=False)
else:
    paths = ce.include_paths()
print("version", torch.__version__)
print("cuda", torch.version.cuda)
print("abi", int(torch._C._GLIBCXX_USE_CXX11_ABI))
for p in paths:
    print("include", p)
EOF
) || die "could not query torch with $PYTHON"

TORCH_VERSION=$(awk '$1 == "version" {print $2}' <<<"$TORCH_INFO")
TORCH_CUDA=$(awk '$1 == "cuda" {print $2}' <<<"$TORCH_INFO")
TORCH_ABI=$(awk '$1 == "abi" {print $2}' <<<"$TORCH_INFO")
mapfile -t TORCH_INCLUDES < <(awk '$1 == "include" {sub(/^include /, ""); print}' <<<"$TORCH_INFO")
((${#TORCH_INCLUDES[@]} > 0)) || die "torch reported no include dirs"
log "torch $TORCH_VERSION (torch.version.cuda=$TORCH_CUDA), _GLIBCXX_USE_CXX11_ABI=$TORCH_ABI"

# Torch headers as -isystem: their own warnings (e.g. -Wunused-parameter) are
# not ours; warnings in csrc/ still show.
TORCH_FLAGS=("-std=${CXX_STD}" -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
  "-D_GLIBCXX_USE_CXX11_ABI=${TORCH_ABI}")
for d in "${TORCH_INCLUDES[@]}"; do TORCH_FLAGS+=(-isystem "$d"); done
if [[ ! -f ${TORCH_INCLUDES[0]}/c10/cuda/impl/cuda_cmake_macros.h ]]; then
  log "torch wheel lacks c10/cuda/impl/cuda_cmake_macros.h (CPU build): -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"
  TORCH_FLAGS+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi

# ---------------------------------------------------------------------------
# SASS check: cuobjdump if there is one, else read the .nv_fatbin directly
# (container magic 0xBA55ED50; each entry: u16 kind @0 (1 PTX, 2/0x10 ELF),
# u32 header size @4, u64 payload size @8, u32 sm arch @28).
CUOBJDUMP=$(command -v cuobjdump || true)
if [[ -z $CUOBJDUMP ]]; then
  top=$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1 || true)
  if [[ -n $top && -x $top/bin/cuobjdump ]]; then CUOBJDUMP=$top/bin/cuobjdump; fi
fi

sass_archs() { # $1: object; prints one SM number per line
  if [[ -n $CUOBJDUMP ]]; then
    "$CUOBJDUMP" --list-elf "$1" | grep -oE 'sm_[0-9]+[a-z]?' | sed 's/^sm_//' | sort -u
  else
    "$PYTHON" - "$1" <<'EOF'
import struct, sys
data = open(sys.argv[1], "rb").read()
magic = struct.pack("<I", 0xBA55ED50)
archs = set()
pos = data.find(magic)
while pos != -1:
    if pos + 16 <= len(data):
        _, ver, hsz, size = struct.unpack_from("<IHHQ", data, pos)
        if ver == 1 and hsz == 16 and pos + 16 + size <= len(data):
            e, end = pos + 16, pos + 16 + size
            while e + 64 <= end:
                kind, _, ehs, payload = struct.unpack_from("<HHIQ", data, e)
                if ehs < 64:
                    break
                if kind in (2, 0x10):
                    archs.add(struct.unpack_from("<I", data, e + 28)[0])
                e += ehs + payload
    pos = data.find(magic, pos + 4)
for a in sorted(archs):
    print(a)
EOF
  fi
}

# ptxas -v summary for one arch: kernels, max registers, max stack, spill bytes.
ptxas_summary() { # $1: log, $2: SM number
  awk -v want="sm_$2" '
    /Compiling entry function/ { arch = $NF; gsub(/\047/, "", arch); if (arch == want) n++ }
    arch == want && /bytes stack frame/ {
      if ($1 + 0 > stack) stack = $1 + 0; spill += $5 + $9 }
    arch == want && /Used [0-9]+ registers/ {
      for (i = 1; i <= NF; i++) if ($i == "Used" && $(i + 1) + 0 > regs) regs = $(i + 1) + 0 }
    END { printf "%d kernels, max %d registers, max stack %d B, spills %d B", n, regs, stack, spill }
  ' "$1"
}

FAILED=0
WARNINGS=0

compile() { # $1: label, $2: source, rest: extra flags
  local label=$1 src=$2
  shift 2
  local stem=${src##*/}
  stem=${stem%.cu}
  local obj=$OUT/$stem.o logf=$OUT/$stem.log
  local t0=$SECONDS rc=0
  log "compiling $src ($label) for ${ARCHS[*]/#/sm_} ..."
  "$NVCC" "${COMMON[@]}" "${GENCODE[@]}" "$@" "$src" -o "$obj" >"$logf" 2>&1 || rc=$?
  # Diagnostics = everything but ptxas -v info (and its indented detail lines).
  local diag
  diag=$(grep -vE '^ptxas info|^    [0-9]+ bytes (stack frame|gmem)' "$logf" || true)
  if ((rc != 0)); then
    printf '%s\n' "$diag"
    log "FAIL $src: nvcc exited $rc after $((SECONDS - t0)) s"
    FAILED=1
    # All archs went through one nvcc call: rebuild each alone to say which failed.
    if ((${#ARCHS[@]} > 1)); then
      local a
      for a in "${ARCHS[@]}"; do
        if "$NVCC" "${COMMON[@]}" -gencode "arch=compute_${a},code=sm_${a}" "$@" "$src" \
          -o "$OUT/arch_check.o" >/dev/null 2>&1; then
          log "OK   $src sm_$a (compiles alone)"
        else
          log "FAIL $src sm_$a"
        fi
      done
    else
      log "FAIL $src sm_${ARCHS[0]}"
    fi
    return 0
  fi
  local nwarn
  nwarn=$(grep -cE '[Ww]arning( #[0-9A-Za-z-]+)? ?:' <<<"$diag" || true)
  if [[ -n $diag ]]; then
    printf '%s\n' "$diag" | sed 's/^/    /'
  fi
  local have
  have=$(sass_archs "$obj" | tr '\n' ' ')
  for a in "${ARCHS[@]}"; do
    if [[ " $have " == *" $a "* ]]; then
      log "OK   $src sm_$a: SASS present; $(ptxas_summary "$logf" "$a")"
    else
      warn "$src: no sm_$a SASS in $obj (found: ${have:-none})"
      if [[ $STRICT == 1 ]]; then FAILED=1; fi
    fi
  done
  if ((nwarn > 0)); then
    warn "$src: $nwarn warning line(s) above"
    WARNINGS=$((WARNINGS + nwarn))
    if [[ $STRICT == 1 ]]; then FAILED=1; fi
  fi
  log "done $src in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------------------
# 1. torch-free kernel header, every dtype x position type the launcher uses.
compile "kernel header, no torch, -std=${KERNEL_STD}" csrc/tests/rope_cuda_standalone.cu \
  "-std=${KERNEL_STD}"

# Accurate-sincos guard: the kernel PTX must not use the approximate
# sin/cos instructions (what __sinf/__cosf/__sincosf or fast math emit).
if [[ $FAILED == 0 ]]; then
  ptx=$OUT/rope_cuda_standalone.ptx
  if "$NVCC" -ptx "-std=${KERNEL_STD}" -O3 -Icsrc -Icsrc/include "-arch=compute_${ARCHS[0]}" \
    csrc/tests/rope_cuda_standalone.cu -o "$ptx" >"$OUT/ptx.log" 2>&1; then
    if grep -qE '(sin|cos)\.approx' "$ptx"; then
      log "FAIL kernel PTX uses sin.approx/cos.approx (fast-math sincos): $(grep -cE '(sin|cos)\.approx' "$ptx") site(s)"
      FAILED=1
    else
      log "OK   kernel PTX (compute_${ARCHS[0]}): no sin.approx/cos.approx, $(grep -c '^\.visible \.entry' "$ptx") kernels"
    fi
  else
    cat "$OUT/ptx.log"
    log "FAIL PTX generation of csrc/tests/rope_cuda_standalone.cu"
    FAILED=1
  fi
fi

# 2. the launcher, with the torch headers and torch's extension flags.
compile "launcher, torch headers, -std=${CXX_STD}" csrc/rope_cuda.cu "${TORCH_FLAGS[@]}"

if [[ $FAILED != 0 ]]; then
  die "CUDA compile check failed after ${SECONDS} s"
fi
log "all CUDA sources compile for ${ARCHS[*]/#/sm_} (${WARNINGS} warning line(s)) in ${SECONDS} s"
