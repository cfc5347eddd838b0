# tailorkv_test(NAME SOURCES... LIBS ... [LABELS ...])
# One gtest binary per component; tests are discovered so each case is its own ctest entry.
function(tailorkv_test name)
  if(NOT TAILORKV_BUILD_TESTS)
    return()
  endif()
  cmake_parse_arguments(T "" "" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${name} ${T_SOURCES})
  target_link_libraries(${name} PRIVATE ${T_LIBS} GTest::gtest GTest::gtest_main GTest::gmock)
  target_compile_definitions(${name} PRIVATE
    TAILORKV_SOURCE_DIR="${CMAKE_SOURCE_DIR}" TAILORKV_MODEL_DIR="${TAILORKV_MODEL_DIR}")
  # One label per binary: gtest_discover_tests flattens a label list. Tests
  # without an explicit label are "unit"; GPU tests carry "gpu".
  set(labels unit)
  if(T_LABELS)
    set(labels ${T_LABELS})
  endif()
  # Passive OpenMP waiting: see services/common/openmp_env.h.
  gtest_discover_tests(${name} PROPERTIES LABELS "${labels}" ENVIRONMENT "OMP_WAIT_POLICY=passive"
    DISCOVERY_TIMEOUT 60)
endfunction()

# Time bounds in tests stretch this many times in sanitizer builds
# (scripts/sanitize.sh), where every process runs several times slower. The
# C++ tests read kSanitizerSlowdown (services/common/test_child_process.h,
# from the compiler's __SANITIZE_ADDRESS__ / __SANITIZE_THREAD__); the Python
# process tests get this value as TAILORKV_TEST_SLOWDOWN (tests/proc_test_util.py)
# and their ctest TIMEOUT times it.
if(CMAKE_CXX_FLAGS MATCHES "-fsanitize=[^ ]*(address|thread)")
  set(TAILORKV_TEST_SLOWDOWN 3)
else()
  set(TAILORKV_TEST_SLOWDOWN 1)
endif()
