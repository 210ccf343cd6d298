/*
 * shoal-agent userns: user namespaces for the daemon, made on the host (never run in a sandbox).
 *
 * `shoal-agent userns SPEC...`, each SPEC `OWNER/MAP`: OWNER is the host uid that creates the namespace
 * (`-`: this process's, root), MAP is `inside:outside:count[,inside:outside:count...]`, written as both
 * the uid and the gid map.  For each SPEC a child takes the owner's ids, unshares a user namespace and
 * waits; this process writes its maps (it is root in the parent namespace, so any range may be mapped).
 * It then prints the children's pids on one line and waits for its stdin to close: meanwhile the daemon
 * opens /proc/PID/ns/user of each.  At EOF the children exit and so does this process.
 *
 * Why a program: the namespace a sandbox's runtime joins must be created by a process running as the
 * sandbox's own host uid (the kernel charges per-user limits such as inotify instances to a namespace's
 * owner), and only a child process can unshare without moving the daemon itself.  The daemon has threads,
 * so it does not fork; this small static program does.
 *
 * Exit status: 0 done; 1 a step failed (message on stderr; children are killed).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_SPECS 8

static pid_t children[MAX_SPECS];
static int nchildren;

static void fail(const char *what) {
    fprintf(stderr, "shoal-agent userns: %s: %s\n", what, strerror(errno));
    for (int i = 0; i < nchildren; i++) kill(children[i], SIGKILL);
    exit(1);
}

static void wait_eof(int fd) {
    char buf[64];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n == 0 || (n < 0 && errno != EINTR)) return;
    }
}

static void write_map(pid_t pid, const char *file, const char *map) {
    char path[64], text[512];
    size_t len = strlen(map);
    if (len >= sizeof text) {
        errno = E2BIG;
        fail("map too long");
    }
    for (size_t i = 0; i <= len; i++) text[i] = map[i] == ',' ? '\n' : map[i] == ':' ? ' ' : map[i];
    snprintf(path, sizeof path, "/proc/%d/%s", (int)pid, file);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) fail(path);
    if (write(fd, text, len) != (ssize_t)len) fail(path);
    close(fd);
}

static pid_t spawn_namespace(const char *spec) {
    const char *slash = strchr(spec, '/');
    if (!slash) {
        errno = EINVAL;
        fail("SPEC is OWNER/MAP");
    }
    long owner = -1;
    if (strncmp(spec, "-/", 2) != 0) {
        char *end;
        owner = strtol(spec, &end, 10);
        if (end != slash || owner < 0) {
            errno = EINVAL;
            fail("OWNER is a uid or -");
        }
    }
    int sync[2];
    if (pipe2(sync, O_CLOEXEC) < 0) fail("pipe");
    pid_t pid = fork();
    if (pid < 0) fail("fork");
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
        close(sync[0]);
        if (owner >= 0) {
            if (setgroups(0, NULL) < 0 || setresgid((gid_t)owner, (gid_t)owner, (gid_t)owner) < 0 ||
                setresuid((uid_t)owner, (uid_t)owner, (uid_t)owner) < 0)
                _exit(2);
        }
        if (unshare(CLONE_NEWUSER) < 0) _exit(3);
        if (write(sync[1], "x", 1) != 1) _exit(4);
        close(sync[1]);
        wait_eof(0);
        _exit(0);
    }
    children[nchildren++] = pid;
    close(sync[1]);
    char c;
    if (read(sync[0], &c, 1) != 1) {
        int status = 0;
        waitpid(pid, &status, 0);
        nchildren--;
        errno = WIFEXITED(status) && WEXITSTATUS(status) == 3 ? EPERM : ECHILD;
        fail("the child could not make a user namespace");
    }
    close(sync[0]);
    write_map(pid, "uid_map", slash + 1);
    write_map(pid, "gid_map", slash + 1);
    return pid;
}

int userns_main(int argc, char **argv) {
    if (argc < 1 || argc > MAX_SPECS) {
        fprintf(stderr, "usage: shoal-agent userns OWNER/MAP...\n");
        return 1;
    }
    for (int i = 0; i < argc; i++) spawn_namespace(argv[i]);
    for (int i = 0; i < nchildren; i++) printf(i ? " %d" : "%d", (int)children[i]);
    printf("\n");
    if (fflush(stdout) != 0) fail("stdout");
    wait_eof(0);
    for (int i = 0; i < nchildren; i++) waitpid(children[i], NULL, 0);
    return 0;
}
