/* Stand-in for macOS's <ucontext.h> on Linux (tests/test_metal_harness_compilers.py): macOS stops with exactly
   this #error unless _XOPEN_SOURCE is defined before the first system header; then the real header follows. */
#ifndef _XOPEN_SOURCE
#error The deprecated ucontext routines require _XOPEN_SOURCE to be defined
#endif
#include_next <ucontext.h>
