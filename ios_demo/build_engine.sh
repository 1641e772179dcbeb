#!/usr/bin/env bash
# Builds the edgemm engine (../native) as one static library per Apple platform slice and packs them as
# ios_demo/build/Edgemm.xcframework, which the Xcode project (project.yml) links. The header and the Swift
# module come from ../native/include and CEdgemm/module.modulemap, not from the xcframework.
#
# Needs macOS with Xcode (xcrun, libtool, lipo, xcodebuild) and CMake >= 3.18. Slices: iOS devices
# (arm64, NEON dot-product kernels) and the simulator (arm64 + x86_64).
#   ./build_engine.sh            # (re)build everything
#   ./build_engine.sh --if-missing   # do nothing when build/Edgemm.xcframework exists
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out="$here/build"
xcf="$out/Edgemm.xcframework"
if [[ "${1:-}" == "--if-missing" && -d "$xcf" ]]; then exit 0; fi
command -v cmake >/dev/null || { echo "build_engine.sh: cmake not found (brew install cmake)" >&2; exit 1; }
command -v xcrun >/dev/null || { echo "build_engine.sh: needs Xcode's command line tools (xcode-select --install)" >&2; exit 1; }
jobs=$(sysctl -n hw.ncpu 2>/dev/null || echo 4)

slice() { # name sdk arch -> $out/name/libedgemm.a
  local dir="$out/$1" sdk=$2 arch=$3
  cmake -S "$root/native" -B "$dir" -G "Unix Makefiles" \
    -DCMAKE_SYSTEM_NAME=iOS -DCMAKE_OSX_SYSROOT="$sdk" -DCMAKE_OSX_ARCHITECTURES="$arch" \
    -DCMAKE_SYSTEM_PROCESSOR="$arch" -DCMAKE_OSX_DEPLOYMENT_TARGET=16.0 -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_TRY_COMPILE_TARGET_TYPE=STATIC_LIBRARY \
    -DEDGEMM_BUILD_TESTS=OFF -DEDGEMM_BUILD_BENCH=OFF -DEDGEMM_BUILD_TOOLS=OFF >/dev/null
  cmake --build "$dir" --target edgemm_engine edgemm_kernels -j "$jobs"
  # one archive with the engine and its kernels (the app links it whole; the C ABI is all Swift sees)
  libtool -static -o "$dir/libedgemm.a" "$dir/libedgemm_engine.a" "$dir/libedgemm_kernels.a"
}

slice ios-arm64 iphoneos arm64
slice sim-arm64 iphonesimulator arm64
slice sim-x86_64 iphonesimulator x86_64
mkdir -p "$out/sim"
lipo -create "$out/sim-arm64/libedgemm.a" "$out/sim-x86_64/libedgemm.a" -output "$out/sim/libedgemm.a"
rm -rf "$xcf"
xcodebuild -create-xcframework -library "$out/ios-arm64/libedgemm.a" -library "$out/sim/libedgemm.a" -output "$xcf"
echo "wrote $xcf"
