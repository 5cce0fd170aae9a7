// A debugging aid for the test suite ending early with no summary (seen 3 times on 2026-12-01; cause unknown):
// preloaded, it logs every exit()/_exit() with a nonzero status to /tmp/exit_trace.PID, with the C stack and the
// Python stack of every thread (the interpreter's own faulthandler dump), then exits as asked.
//
//   gcc -shared -fPIC -O1 -o /tmp/exit_trace.so scripts/exit_trace.c -ldl
//   LD_PRELOAD=/tmp/exit_trace.so .venv/bin/python -m pytest -q tests; cat /tmp/exit_trace.*
//
// Child processes inherit the preload; a process killed by a signal logs nothing (its status says which).
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

static void report(const char* how, int status) {
  if (status == 0) return;
  char path[64];
  snprintf(path, sizeof path, "/tmp/exit_trace.%d", getpid());
  int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (fd < 0) return;
  char cmd[512] = {0};
  int c = open("/proc/self/cmdline", O_RDONLY);
  if (c >= 0) {
    ssize_t n = read(c, cmd, sizeof cmd - 1);
    close(c);
    for (ssize_t i = 0; i < n; i++)
      if (!cmd[i]) cmd[i] = ' ';
  }
  dprintf(fd, "%s(%d) pid %d ppid %d: %s\n", how, status, getpid(), getppid(), cmd);
  void* frames[64];
  backtrace_symbols_fd(frames, backtrace(frames, 64), fd);
  // CPython's faulthandler dump: every thread's Python stack, safe without the GIL
  const char* (*dump)(int, void*, void*) = (const char* (*)(int, void*, void*))dlsym(RTLD_DEFAULT, "_Py_DumpTracebackThreads");
  if (dump) dump(fd, NULL, NULL);
  close(fd);
}

void exit(int status) {
  report("exit", status);
  void (*real)(int) = (void (*)(int))dlsym(RTLD_NEXT, "exit");
  real(status);
  __builtin_unreachable();
}

void _exit(int status) {
  report("_exit", status);
  void (*real)(int) = (void (*)(int))dlsym(RTLD_NEXT, "_exit");
  real(status);
  __builtin_unreachable();
}
