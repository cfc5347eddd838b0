// Status propagation macros. Debian's Abseil (20220623) ships no public
// RETURN_IF_ERROR / ASSIGN_OR_RETURN, so they are defined once here.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define TKV_CONCAT_INNER_(a, b) a##b
#define TKV_CONCAT_(a, b) TKV_CONCAT_INNER_(a, b)

// Returns the status from the enclosing function when `expr` is not OK.
#define RETURN_IF_ERROR(expr)                          \
  do {                                                 \
    ::absl::Status tkv_status_ = (expr);               \
    if (!tkv_status_.ok()) return tkv_status_;         \
  } while (0)

// ASSIGN_OR_RETURN(lhs, expr): evaluates `expr` (a StatusOr), returns its
// status on error, otherwise move-assigns the value to `lhs` (which may be a
// declaration such as `auto x`).
#define ASSIGN_OR_RETURN(lhs, expr) \
  TKV_ASSIGN_OR_RETURN_IMPL_(TKV_CONCAT_(tkv_statusor_, __LINE__), lhs, expr)
#define TKV_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                               \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()
