# Cross-compile for aarch64 Linux with Debian's g++-aarch64-linux-gnu; ctest runs the binaries with
# qemu-user (Debian's qemu-user), emulating a CPU with the dot-product extension.
#   cmake -S native -B native/build-arm64 -DCMAKE_TOOLCHAIN_FILE=native/cmake/aarch64-linux-gnu.cmake
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
find_program(EDGEMM_QEMU_AARCH64 qemu-aarch64)
if(EDGEMM_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR "${EDGEMM_QEMU_AARCH64};-cpu;max;-L;/usr/aarch64-linux-gnu")
endif()
