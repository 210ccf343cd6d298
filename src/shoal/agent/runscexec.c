/*
 * shoal-agent runsc-exec [--hide-net] [--no-membarrier] PROGRAM [ARG...]: how the daemon runs runsc on the host.
 *
 * --hide-net: in a private mount namespace of its own, an empty read-only tmpfs over /proc/sys/net.  Debian's
 *   runsc takes any network namespace in which /proc/sys/net/core/rmem_default exists for the host's and
 *   refuses it, and since Linux 6.x that file exists in every one (runtime/gvisor.py says more).  This did the
 *   same as `unshare --mount --propagation private -- sh -c 'mount -t tmpfs ... && exec "$@"'` at a quarter of
 *   the cost (three programs fewer: ~4 -> ~1 ms).
 * --no-membarrier: membarrier(2) fails with ENOSYS.  Every runsc process registers for private expedited
 *   memory barriers at start (gVisor's hostmm package, in a Go init function), and once the Go runtime has
 *   threads that registration waits for an RCU grace period: ~10 ms of every `runsc pause`, `state`, `kill`,
 *   `checkpoint` (`runsc --version` 24 -> 10 ms p50 without it).  Only a Sentry uses those barriers, and the
 *   filter is inherited by everything PROGRAM starts: never for `runsc create`, `run` or `restore`
 *   (decision 0073).  If the filter cannot be installed, PROGRAM runs without it, only slower.
 *
 * Exit status: PROGRAM's; 126 if --hide-net failed (message on stderr); 127 if PROGRAM cannot run.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#define THIS_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define THIS_ARCH AUDIT_ARCH_AARCH64
#endif

static int hide_net(void) {
    if (unshare(CLONE_NEWNS) != 0) { perror("runsc-exec: unshare"); return -1; }
    if (mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) { perror("runsc-exec: private /"); return -1; }
    if (mount("shoal-runsc", "/proc/sys/net", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=555") != 0) {
        perror("runsc-exec: tmpfs over /proc/sys/net");
        return -1;
    }
    return 0;
}

static void no_membarrier(void) {
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
    (void)prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);  /* root may; without it runsc is just slower */
#endif
}

int runscexec_main(int argc, char **argv) {
    int i = 0;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (!strcmp(argv[i], "--hide-net")) {
            if (hide_net() != 0) return 126;
        } else if (!strcmp(argv[i], "--no-membarrier")) {
            no_membarrier();
        } else {
            break;
        }
    }
    if (i >= argc) {
        fprintf(stderr, "usage: shoal-agent runsc-exec [--hide-net] [--no-membarrier] PROGRAM [ARG...]\n");
        return 127;
    }
    execv(argv[i], argv + i);
    perror(argv[i]);
    return 127;
}
