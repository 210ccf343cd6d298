/*
 * shoal-agent no-membarrier PROGRAM [ARG...]: run PROGRAM with membarrier(2) failing (ENOSYS), on the host.
 *
 * Why: every runsc process registers for private expedited memory barriers at start (gVisor's hostmm
 * package, in a Go init function), and once the Go runtime has threads that registration waits for an RCU
 * grace period: ~10 ms of every `runsc pause`, `state`, `kill`, `checkpoint` (measured: `runsc --version`
 * 24 -> 10 ms p50 without it).  Only a Sentry uses those barriers, so the daemon runs the runsc commands that
 * start no Sentry through this.  The filter is inherited by everything PROGRAM starts: never use it for
 * `runsc create`, `run` or `restore`.
 *
 * If the filter cannot be installed, PROGRAM runs without it.  Exit status: PROGRAM's, or 127 if it cannot run.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#define THIS_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define THIS_ARCH AUDIT_ARCH_AARCH64
#endif

int nomembarrier_main(int argc, char **argv) {
    if (argc < 1) {
        fprintf(stderr, "usage: shoal-agent no-membarrier PROGRAM [ARG...]\n");
        return 127;
    }
#ifdef THIS_ARCH
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, THIS_ARCH, 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_membarrier, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {.len = sizeof filter / sizeof filter[0], .filter = filter};
    (void)prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);  /* root may; without it the program is just slower */
#endif
    execv(argv[0], argv);
    perror(argv[0]);
    return 127;
}
