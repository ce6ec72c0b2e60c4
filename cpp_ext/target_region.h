// A region of code compiled for an instruction set the rest of the build may not assume:
//
//   EVLM_TARGET_BEGIN("avx2,fma", "avx2,fma")   // GCC's target string, then Clang's
//   namespace avx2 { ... }                      // every function defined here gets the target
//   EVLM_TARGET_END
//
// A pragma region rather than a per-file -m flag: inline functions from shared headers instantiated in
// such a file could otherwise be emitted with wide instructions and picked by the linker for code that
// every CPU runs. Templates defined before the region (the standard library) keep the default target.
#pragma once

#define EVLM_PRAGMA(...) _Pragma(#__VA_ARGS__)
#if defined(__clang__)
#define EVLM_TARGET_BEGIN(gcc_target, clang_target) \
  EVLM_PRAGMA(clang attribute push(__attribute__((target(clang_target))), apply_to = function))
#define EVLM_TARGET_END EVLM_PRAGMA(clang attribute pop)
#else
#define EVLM_TARGET_BEGIN(gcc_target, clang_target) EVLM_PRAGMA(GCC push_options) EVLM_PRAGMA(GCC target(gcc_target))
#define EVLM_TARGET_END EVLM_PRAGMA(GCC pop_options)
#endif
