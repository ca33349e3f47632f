// The C++ unit tests' one assertion: CHECK(cond, printf-format, ...) counts and reports a
// failure and goes on, so one run shows every failing case; main returns failures != 0.
#pragma once

#include <cstdio>

static int failures = 0;

#define CHECK(cond, ...)                                          \
  do {                                                            \
    if (!(cond)) {                                                \
      ++failures;                                                 \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                   \
      std::printf("\n");                                          \
    }                                                             \
  } while (0)
