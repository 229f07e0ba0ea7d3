# Sourced by the scripts: where the locally installed libraries are.
ACE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$ACE_ROOT/.deps/onnxruntime/lib/libonnxruntime.so}
if [ -d "$ACE_ROOT/.deps/nvrtc/lib" ]; then
  export LD_LIBRARY_PATH="$ACE_ROOT/.deps/nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
