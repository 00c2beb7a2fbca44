# Cross-compiling for 64-bit Arm Linux boards with Debian/Ubuntu's
# g++-aarch64-linux-gnu:
#   cmake -S custom_ops -B custom_ops/build-aarch64 \
#         -DCMAKE_TOOLCHAIN_FILE=$PWD/custom_ops/cmake/aarch64-linux-gnu.cmake
# (CMake resolves a relative toolchain path against the build folder.)
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(MFQAT_CROSS_PREFIX "aarch64-linux-gnu-" CACHE STRING "Prefix of the cross toolchain executables")
set(CMAKE_C_COMPILER "${MFQAT_CROSS_PREFIX}gcc")
set(CMAKE_CXX_COMPILER "${MFQAT_CROSS_PREFIX}g++")

# Look for headers and libraries of the target only; the build runs host
# programs (python for the header download) from the host.
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
