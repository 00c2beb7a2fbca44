# Downloads the pinned wheel with pip, checks its sha256 and extracts the
# ONNX Runtime API headers into MFQAT_ORT_HEADERS_CACHE. Sets ORT_INCLUDE_DIR.
include("${CMAKE_CURRENT_LIST_DIR}/OrtHeadersPin.cmake")

set(MFQAT_ORT_HEADERS_CACHE "${CMAKE_BINARY_DIR}/ort-headers"
    CACHE PATH "Folder that receives the fetched ONNX Runtime headers")
set(_mfqat_dest "${MFQAT_ORT_HEADERS_CACHE}/${MFQAT_ORT_HEADERS_PACKAGE}-${MFQAT_ORT_HEADERS_VERSION}")

set(_mfqat_complete TRUE)
foreach(_header IN LISTS MFQAT_ORT_HEADERS_FILES)
  if(NOT EXISTS "${_mfqat_dest}/${_header}")
    set(_mfqat_complete FALSE)
  endif()
endforeach()

if(NOT _mfqat_complete)
  find_package(Python3 REQUIRED COMPONENTS Interpreter)
  set(_mfqat_download "${CMAKE_BINARY_DIR}/ort-headers-download")
  file(REMOVE_RECURSE "${_mfqat_download}")
  message(STATUS "Fetching ONNX Runtime headers from ${MFQAT_ORT_HEADERS_PACKAGE}==${MFQAT_ORT_HEADERS_VERSION}")
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check
            "${MFQAT_ORT_HEADERS_PACKAGE}==${MFQAT_ORT_HEADERS_VERSION}" -d "${_mfqat_download}"
    RESULT_VARIABLE _mfqat_result
    OUTPUT_VARIABLE _mfqat_output
    ERROR_VARIABLE _mfqat_output)
  set(_mfqat_wheel "${_mfqat_download}/${MFQAT_ORT_HEADERS_WHEEL}")
  if(NOT _mfqat_result EQUAL 0 OR NOT EXISTS "${_mfqat_wheel}")
    message(FATAL_ERROR
      "pip download of ${MFQAT_ORT_HEADERS_PACKAGE}==${MFQAT_ORT_HEADERS_VERSION} failed:\n${_mfqat_output}\n"
      "Pass -DORT_INCLUDE_DIR=<folder with onnxruntime_c_api.h> to build without the download.")
  endif()
  file(SHA256 "${_mfqat_wheel}" _mfqat_hash)
  if(NOT _mfqat_hash STREQUAL MFQAT_ORT_HEADERS_WHEEL_SHA256)
    message(FATAL_ERROR
      "${MFQAT_ORT_HEADERS_WHEEL} has sha256 ${_mfqat_hash}, expected ${MFQAT_ORT_HEADERS_WHEEL_SHA256}; "
      "refusing to use headers from an unverified file")
  endif()

  set(_mfqat_patterns "")
  foreach(_header IN LISTS MFQAT_ORT_HEADERS_FILES)
    list(APPEND _mfqat_patterns "${MFQAT_ORT_HEADERS_PREFIX}/${_header}")
  endforeach()
  file(ARCHIVE_EXTRACT INPUT "${_mfqat_wheel}" DESTINATION "${_mfqat_download}/x" PATTERNS ${_mfqat_patterns})
  file(MAKE_DIRECTORY "${_mfqat_dest}")
  foreach(_header IN LISTS MFQAT_ORT_HEADERS_FILES)
    file(COPY "${_mfqat_download}/x/${MFQAT_ORT_HEADERS_PREFIX}/${_header}" DESTINATION "${_mfqat_dest}")
  endforeach()
  file(REMOVE_RECURSE "${_mfqat_download}")
endif()

set(ORT_INCLUDE_DIR "${_mfqat_dest}" CACHE PATH "Folder with onnxruntime_c_api.h" FORCE)
