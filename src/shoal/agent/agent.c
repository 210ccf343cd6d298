/*
 * shoal-agent: PID 1 of every shoal sandbox.
 *
 * It starts the entrypoint and every exec, reaps all zombies, carries stdio
 * between processes and the daemon, and enforces exec deadlines.  It is a
 * static binary so it runs in any image (no libc, no Python needed) and under
 * gVisor.
 *
 * Trust: the daemon trusts nothing this program sends (code in the sandbox
 * runs as the same user and can tamper with it).  This program trusts the
 * daemon's frames, which only the daemon can send: the first connection is a
 * socketpair end inherited as a file descriptor, and a reconnection (after a
 * daemon restart) is only accepted by the daemon with the token it gave on
 * the first connection.  The process is made non-dumpable so that code in the
 * sandbox, which holds no CAP_SYS_PTRACE, can neither read that token from
 * memory nor steal the control descriptor.
 *
 * Wire format (little-endian), both directions:
 *   frame   = u32 length-of-rest | u8 type | fields...
 *   field   = u8 tag | u32 length | bytes
 * Integers inside fields are u64.  See shoal/agent/protocol.py.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <grp.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define AGENT_VERSION 4  /* 2: SUSPEND can park (F_PARK); 3: SIGNAL can forget (F_FORGET); 4: RESIZE */

enum {
    MSG_INIT = 1, MSG_EXEC = 2, MSG_STDIN = 3, MSG_ACK = 4,
    MSG_SIGNAL = 5, MSG_EXIT_ACK = 6, MSG_SUSPEND = 7, MSG_RESUME = 8, MSG_RESIZE = 9,
    MSG_HELLO = 101, MSG_STARTED = 102, MSG_OUTPUT = 103, MSG_EOF = 104,
    MSG_EXIT = 105, MSG_STDIN_ACK = 106, MSG_SUSPENDED = 107,
};
enum {
    T_ID = 1, T_ARG = 2, T_ENV = 3, T_CWD = 4, T_TIMEOUT_MS = 5, T_FLAGS = 6,
    T_OFFSET = 7, T_DATA = 8, T_FD = 9, T_PID = 10, T_KIND = 11, T_VALUE = 12,
    T_TOKEN = 13, T_VERSION = 14, T_SIGNO = 15, T_PROC = 16, T_STATE = 17, T_USER = 18,
    T_ROWS = 19, T_COLS = 20,
};
enum { F_PTY = 1, F_STDOUT_NULL = 2, F_STDERR_NULL = 4, F_ENTRYPOINT = 8 };
enum { F_EOF = 1 };
enum { F_RESTORED = 1 };  /* RESUME's flag: the sandbox was restored from a checkpoint */
enum { F_PARK = 1 };      /* SUSPEND's flag: close the connection once SUSPENDED is sent (see park()) */
enum { F_FORGET = 1 };    /* SIGNAL's flag: kill the process and drop it unreported (see forget()) */
enum { EXIT_CODE = 0, EXIT_SIGNAL = 1, EXIT_TIMEOUT = 2, EXIT_SPAWN_FAILED = 3 };

#define MAX_FRAME (8u << 20)
#define MAX_ID 64
#define CHUNK 65536
#define STREAM_CAP (8u << 20)   /* unacknowledged output kept per stream */
#define OUT_HIGH (1u << 20)     /* stop producing frames above this */

struct buf { char *p; size_t off, len, cap; };

static void die(const char *what) {
    dprintf(2, "shoal-agent: %s: %s\n", what, strerror(errno));
    _exit(111);
}

static void buf_reserve(struct buf *b, size_t extra) {
    if (b->off + b->len + extra <= b->cap) return;
    /* Compact only when the bytes to move are no more than the space that frees: each byte is moved a
     * bounded number of times (moving a nearly full 8 MiB buffer for every 64 KiB read made streaming
     * output cost O(n * buffer)). */
    if (b->off && b->off >= b->len) {
        memmove(b->p, b->p + b->off, b->len);
        b->off = 0;
        if (b->len + extra <= b->cap) return;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->off + b->len + extra) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) die("out of memory");
    b->p = p;
    b->cap = cap;
}
static void buf_put(struct buf *b, const void *data, size_t n) {
    buf_reserve(b, n);
    memcpy(b->p + b->off + b->len, data, n);
    b->len += n;
}
static void buf_drop(struct buf *b, size_t n) {
    if (n >= b->len) { b->off = b->len = 0; return; }
    b->off += n;
    b->len -= n;
}
static char *buf_data(struct buf *b) { return b->p + b->off; }
static void buf_free(struct buf *b) { free(b->p); memset(b, 0, sizeof *b); }

/* ---------- frame building ---------- */

static struct buf out;      /* bytes queued for the daemon */
static size_t frame_start;

static void frame_begin(uint8_t type) {
    uint32_t zero = 0;
    frame_start = out.len;
    buf_put(&out, &zero, 4);
    buf_put(&out, &type, 1);
}
static void field(uint8_t tag, const void *data, uint32_t n) {
    buf_put(&out, &tag, 1);
    buf_put(&out, &n, 4);
    if (n) buf_put(&out, data, n);
}
static void field_u64(uint8_t tag, uint64_t v) { field(tag, &v, 8); }
static void field_str(uint8_t tag, const char *s) { field(tag, s, (uint32_t)strlen(s)); }
static void frame_end(void) {
    uint32_t n = (uint32_t)(out.len - frame_start - 4);
    memcpy(buf_data(&out) + frame_start, &n, 4);
}

/* ---------- frame parsing ---------- */

struct fields { const char *p; size_t n; };

/* Next field; returns 0 at the end or on a malformed frame. */
static int next_field(struct fields *f, uint8_t *tag, const char **val, uint32_t *len) {
    if (f->n < 5) return 0;
    uint32_t n;
    memcpy(&n, f->p + 1, 4);
    if (n > f->n - 5) return 0;
    *tag = (uint8_t)f->p[0];
    *val = f->p + 5;
    *len = n;
    f->p += 5 + n;
    f->n -= 5 + n;
    return 1;
}
static uint64_t as_u64(const char *v, uint32_t len) {
    uint64_t x = 0;
    if (len == 8) memcpy(&x, v, 8);
    return x;
}

/* ---------- processes ---------- */

struct stream {
    int fd;            /* our read end; -1 once closed */
    int eof;           /* no more bytes will come */
    int eof_sent, eof_acked;
    uint64_t base;     /* absolute offset of data[0] (all before it acknowledged) */
    uint64_t sent;     /* absolute offset sent on the current connection */
    uint64_t exit_mark; /* bytes read when the process exited */
    struct buf data;
};

struct proc {
    struct proc *next;
    char id[MAX_ID + 1];
    pid_t pid;
    int flags;
    int stdin_fd;               /* write end; -1 once closed */
    struct buf stdin_pending;
    uint64_t stdin_offset;      /* bytes accepted from the daemon */
    int stdin_eof;              /* close stdin once pending is written */
    struct stream st[2];        /* stdout, stderr */
    struct timespec deadline;
    int has_deadline, timed_out;
    int exited, exit_kind, exit_value, exit_sent, exit_acked;
    int spawn_fd;               /* read end of the child's exec report until it is settled, else -1 */
    const char *spawn_cwd, *spawn_user;
    char spawn_argv0[256];
    int started_pending;  /* settled while suspended: its STARTED waits for the resume */
};

static struct proc *procs;
static struct proc *forgotten;  /* unlinked by forget(), freed at the end of the loop's turn */
static int ctl = -1;
static struct buf in;
static char token[128];
static size_t token_len;
static const char *reconnect_path;
static struct timespec reconnect_at;
static int reconnect_ms = 20;
static int entrypoint_done;
/* Between SUSPEND and RESUME the agent sends nothing, so that a checkpoint of the sandbox holds no frame half
 * sent or half read (runsc checkpoint, for a memory snapshot). */
static int suspended;
/* A connection made after a daemon restart is a host socket, which gVisor cannot checkpoint: for a memory
 * snapshot the agent "parks" instead of staying suspended on it (it closes it once SUSPENDED is sent, keeping
 * every stream's offsets).  It comes back either by reconnecting (the sandbox that was snapshotted, once the
 * daemon listens again) or, in a sandbox restored from that checkpoint, through home_fd: the descriptor it was
 * started with, kept open for this, which a restore connects to the new daemon. */
static int parking, parked;
static int home_fd = -1;

static struct proc *find_proc(const char *id, uint32_t n) {
    for (struct proc *p = procs; p; p = p->next)
        if (strlen(p->id) == n && memcmp(p->id, id, n) == 0) return p;
    return NULL;
}

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

static void now(struct timespec *t) { clock_gettime(CLOCK_MONOTONIC, t); }
static long ms_until(const struct timespec *t) {
    struct timespec n;
    now(&n);
    long ms = (t->tv_sec - n.tv_sec) * 1000 + (t->tv_nsec - n.tv_nsec) / 1000000;
    return ms < 0 ? 0 : ms + 1;
}

static void close_stream(struct stream *s) {
    if (s->fd >= 0) close(s->fd);
    s->fd = -1;
    s->eof = 1;
}

/* Read whatever a stream has now, up to its cap.  Returns bytes read. */
static size_t read_stream(struct stream *s) {
    size_t total = 0;
    char tmp[CHUNK];
    while (s->fd >= 0 && s->data.len < STREAM_CAP) {
        ssize_t r = read(s->fd, tmp, sizeof tmp);
        if (r > 0) { buf_put(&s->data, tmp, (size_t)r); total += (size_t)r; continue; }
        if (r < 0 && (errno == EINTR)) continue;
        if (r < 0 && errno == EAGAIN) break;
        close_stream(s);  /* EOF, or EIO from a pty whose last writer left */
    }
    return total;
}

static void send_started(struct proc *p) {
    frame_begin(MSG_STARTED);
    field_str(T_ID, p->id);
    field_u64(T_PID, (uint64_t)p->pid);
    frame_end();
}

/* Find `key` (a name, or a number in field `idfield`) in a passwd- or group-format file; copies the line's
 * fields into `fields` (up to 7).  Returns 1 when found. */
static int lookup(const char *file, const char *key, int idfield, char *line, size_t size, char **fields) {
    FILE *f = fopen(file, "re");
    if (!f) return 0;
    int found = 0;
    while (!found && fgets(line, (int)size, f)) {
        line[strcspn(line, "\n")] = 0;
        int n = 0;
        char *s = line;
        for (; n < 7; n++) {
            fields[n] = s;
            s = strchr(s, ':');
            if (!s) { n++; break; }
            *s++ = 0;
        }
        for (int i = n; i < 7; i++) fields[i] = "";
        found = n > idfield && (!strcmp(fields[0], key) || !strcmp(fields[idfield], key));
    }
    fclose(f);
    return found;
}

static int all_digits(const char *s) {
    if (!*s) return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9') return 0;
    return 1;
}

/* Become the image's USER ("name", "uid", "name:group" ...), as the sandbox's /etc/passwd and /etc/group say.
 * Sets HOME from the passwd entry when the environment has none.  Returns 0, or -1 with errno set. */
static int become(const char *spec, char ***envp) {
    char user[256], group[256] = "", line[4096], *pw[7], *gr[7];
    snprintf(user, sizeof user, "%s", spec);
    char *colon = strchr(user, ':');
    if (colon) { *colon = 0; snprintf(group, sizeof group, "%s", colon + 1); }
    long uid, gid;
    char home[1024] = "", name[256] = "";
    if (lookup("/etc/passwd", user, 2, line, sizeof line, pw)) {
        uid = atol(pw[2]);
        gid = atol(pw[3]);
        snprintf(home, sizeof home, "%s", pw[5]);
        snprintf(name, sizeof name, "%s", pw[0]);
    } else if (all_digits(user)) {
        uid = atol(user);
        gid = 0;
    } else {
        errno = ENOENT;
        return -1;
    }
    if (*group) {
        if (lookup("/etc/group", group, 2, line, sizeof line, gr)) gid = atol(gr[2]);
        else if (all_digits(group)) gid = atol(group);
        else { errno = ENOENT; return -1; }
    }
    gid_t groups[64];
    int ngroups = 0;
    groups[ngroups++] = (gid_t)gid;
    FILE *f = *name ? fopen("/etc/group", "re") : NULL;
    while (f && ngroups < 64 && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        char *fields[4] = {line, NULL, NULL, NULL}, *s = line;
        for (int i = 1; i < 4 && (s = strchr(s, ':')); i++) { *s++ = 0; fields[i] = s; }
        if (!fields[3]) continue;
        for (char *m = strtok(fields[3], ","); m; m = strtok(NULL, ","))
            if (!strcmp(m, name)) { groups[ngroups++] = (gid_t)atol(fields[2]); break; }
    }
    if (f) fclose(f);
    if (setgroups((size_t)ngroups, groups) || setgid((gid_t)gid) || setuid((uid_t)uid)) return -1;
    int has_home = 0, n = 0;
    for (; (*envp)[n]; n++)
        if (!strncmp((*envp)[n], "HOME=", 5)) has_home = 1;
    if (!has_home && *home) {
        char **grown = realloc(*envp, (size_t)(n + 2) * sizeof **envp);
        if (grown) {
            size_t len = strlen(home) + 6;
            grown[n] = malloc(len);
            if (grown[n]) { snprintf(grown[n], len, "HOME=%s", home); grown[n + 1] = NULL; }
            else grown[n] = NULL;
            *envp = grown;
        }
    }
    return 0;
}

/* Root, as the agent already is: only give the process HOME=/root when its environment has none. */
static void set_default_home(char ***envp) {
    int n = 0;
    for (; (*envp)[n]; n++)
        if (!strncmp((*envp)[n], "HOME=", 5)) return;
    char **grown = realloc(*envp, (size_t)(n + 2) * sizeof **envp);
    if (!grown) return;
    grown[n] = strdup("HOME=/root");
    grown[n + 1] = NULL;
    *envp = grown;
}

int fs_main(int argc, char **argv); /* fstool.c: `shoal-agent fs ...`, the filesystem API's tool */
int userns_main(int argc, char **argv); /* userns.c: `shoal-agent userns ...`, run by the daemon on the host */
int runscexec_main(int argc, char **argv); /* runscexec.c: `shoal-agent runsc-exec ...`, how the daemon runs runsc */

#define SELF_PATH "/.shoal/bin/shoal-agent"

/* Close every descriptor above 2: close_range, else (older kernels, gVisor) what /proc/self/fd lists. */
static void close_above_stdio(void) {
    if (close_range(3, ~0U, 0) == 0) return;
    for (;;) {
        DIR *d = opendir("/proc/self/fd");
        if (!d) {
            static const char msg[] = "shoal-agent: cannot close inherited descriptors (no /proc)\n";
            (void)!write(2, msg, sizeof msg - 1);
            _exit(126);
        }
        int found[256], n = 0;
        struct dirent *e;
        while ((e = readdir(d)) && n < 256) {
            int fd = atoi(e->d_name);
            if (fd > 2 && fd != dirfd(d)) found[n++] = fd;
        }
        closedir(d);
        if (!n) return;
        for (int i = 0; i < n; i++) close(found[i]);
    }
}

static char *cmdline_area;  /* PID 1's own argv strings: what /proc/PID/cmdline shows for it and its forks */
static size_t cmdline_len;

/* The filesystem tool is this very program: a forked child runs it directly instead of exec'ing the binary
 * again (the exec is ~0.35 ms, most of a small file operation).  It drops what it copied from PID 1 first: the
 * reconnection token and every descriptor beyond stdio (closing errfd tells the parent that it started).  It
 * stays non-dumpable, so nothing else in the sandbox can read the rest of PID 1's memory that it holds. */
static void run_fs_tool(char **argv) {
    explicit_bzero(token, sizeof token);
    token_len = 0;
    /* Show the tool's command line, not PID 1's, to `ps` (as much of it as fits). */
    size_t at = 0;
    for (int i = 0; argv[i] && at < cmdline_len; i++) {
        size_t n = strlen(argv[i]) + 1;
        if (n > cmdline_len - at) n = cmdline_len - at;
        memcpy(cmdline_area + at, argv[i], n);
        at += n;
    }
    if (at) {
        memset(cmdline_area + at, 0, cmdline_len - at);
        cmdline_area[cmdline_len - 1] = 0;
    }
    close_above_stdio();
    int argc = 0;
    while (argv[argc]) argc++;
    exit(fs_main(argc - 2, argv + 2));
}

/* Linux drops a signal that code in the sandbox sends to its PID namespace's init unless the init handles it;
 * gVisor's kernel (runsc 20240729) delivers it, so `kill -TERM 1` would end the sandbox.  Ignoring every signal
 * whose default would end or stop this process keeps it running under both (a real fault still kills: the kernel
 * forces SIGSEGV and its kind).  SIGKILL and SIGSTOP cannot be ignored; child_exec restores the defaults. */
static void ignore_signals_from_inside(void) {
    for (int s = 1; s < NSIG; s++) {
        if (s == SIGKILL || s == SIGSTOP || s == SIGCHLD || s == SIGCONT || s == SIGURG || s == SIGWINCH) continue;
        signal(s, SIG_IGN);
    }
}

static void child_exec(char **argv, char **envp, const char *cwd, const char *user, int errfd) {
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    for (int s = 1; s < NSIG; s++) signal(s, SIG_DFL);
    int stage = 3;
    if (user && *user) {
        if (become(user, &envp) != 0) goto fail;
    } else {
        set_default_home(&envp);
    }
    stage = 1;
    if (cwd && *cwd && chdir(cwd) != 0) goto fail;
    stage = 2;
    environ = envp;
    if (argv[0] && argv[1] && !strcmp(argv[0], SELF_PATH) && !strcmp(argv[1], "fs")) run_fs_tool(argv);
    execvp(argv[0], argv);
fail:;
    int report[2] = {stage, errno};
    (void)!write(errfd, report, sizeof report);
    _exit(127);
}

static struct proc *spawn(const char *id, uint32_t idlen, char **argv, char **envp,
                          const char *cwd, const char *user, int flags, uint64_t timeout_ms,
                          struct winsize ws) {
    struct proc *p = calloc(1, sizeof *p);
    if (!p) die("out of memory");
    memcpy(p->id, id, idlen);
    p->flags = flags;
    p->stdin_fd = -1;
    p->st[0].fd = p->st[1].fd = -1;

    int in_p[2] = {-1, -1}, out_p[2] = {-1, -1}, err_p[2] = {-1, -1}, ep[2];
    int master = -1, slave = -1;
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (pipe2(ep, O_CLOEXEC) < 0) die("pipe");
    if (flags & F_PTY) {
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) || unlockpt(master)) goto spawn_error;
        char *name = ptsname(master);
        if (!name || (slave = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0) goto spawn_error;
        ioctl(master, TIOCSWINSZ, &ws);
    } else {
        if (pipe2(in_p, O_CLOEXEC) < 0) goto spawn_error;
        if (!(flags & F_STDOUT_NULL) && pipe2(out_p, O_CLOEXEC) < 0) goto spawn_error;
        if (!(flags & F_STDERR_NULL) && pipe2(err_p, O_CLOEXEC) < 0) goto spawn_error;
    }

    pid_t pid = fork();
    if (pid < 0) goto spawn_error;
    if (pid == 0) {
        setsid();
        if (flags & F_PTY) {
            ioctl(slave, TIOCSCTTY, 0);
            dup2(slave, 0); dup2(slave, 1); dup2(slave, 2);
        } else {
            dup2(in_p[0], 0);
            dup2(out_p[1] >= 0 ? out_p[1] : devnull, 1);
            dup2(err_p[1] >= 0 ? err_p[1] : devnull, 2);
        }
        child_exec(argv, envp, cwd, user, ep[1]);
    }
    p->pid = pid;
    close(ep[1]);
    /* The child's exec is not waited for here (under gVisor it takes tens of ms, and the next EXEC — the first
     * exec after a sandbox's entrypoint — would queue behind it): `settle_spawn` reads its report later. */
    p->spawn_fd = ep[0];
    set_nonblock(ep[0]);
    snprintf(p->spawn_argv0, sizeof p->spawn_argv0, "%s", argv[0] ? argv[0] : "");
    p->spawn_cwd = cwd && *cwd ? strdup(cwd) : NULL;
    p->spawn_user = user && *user ? strdup(user) : NULL;
    if (flags & F_PTY) {
        close(slave);
        set_nonblock(master);
        p->st[0].fd = master;
        p->stdin_fd = fcntl(master, F_DUPFD_CLOEXEC, 3);
        p->st[1].eof = 1;
    } else {
        close(in_p[0]);
        p->stdin_fd = in_p[1];
        set_nonblock(p->stdin_fd);
        if (out_p[0] >= 0) { close(out_p[1]); p->st[0].fd = out_p[0]; set_nonblock(out_p[0]); }
        else p->st[0].eof = 1;
        if (err_p[0] >= 0) { close(err_p[1]); p->st[1].fd = err_p[0]; set_nonblock(err_p[0]); }
        else p->st[1].eof = 1;
    }
    close(devnull);
    if (timeout_ms) {
        now(&p->deadline);
        p->deadline.tv_sec += (time_t)(timeout_ms / 1000);
        p->deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
        if (p->deadline.tv_nsec >= 1000000000) { p->deadline.tv_sec++; p->deadline.tv_nsec -= 1000000000; }
        p->has_deadline = 1;
    }
    p->next = procs;
    procs = p;
    return p;

spawn_error:
    die("cannot set up a process");
    return NULL;
}

/* Read the child's exec report: nothing (exec happened: the descriptor closed with it) or a failed step, which
 * becomes the process's stderr and its 126/127.  `wait`: block until the child has exec'd or died. Sends STARTED
 * once settled, so that STARTED comes before any of the process's output or its exit. */
static void settle_spawn(struct proc *p, int wait) {
    if (p->spawn_fd < 0) return;
    int report[2];
    ssize_t r;
    for (;;) {
        r = read(p->spawn_fd, report, sizeof report);
        if (r >= 0 || errno == EINTR) { if (r >= 0) break; continue; }
        if (errno != EAGAIN || !wait) return;
        struct pollfd one = {.fd = p->spawn_fd, .events = POLLIN};
        poll(&one, 1, -1);
    }
    close(p->spawn_fd);
    p->spawn_fd = -1;
    if (r == (ssize_t)sizeof report) {
        /* chdir or execve failed in the child: say so on stderr, exit 126/127. */
        char msg[512];
        static const char *what[] = {"", "cannot change to directory", "cannot execute", "cannot switch to user"};
        const char *subject = report[0] == 1 ? p->spawn_cwd : report[0] == 3 ? p->spawn_user : p->spawn_argv0;
        int n = snprintf(msg, sizeof msg, "shoal: %s: %s: %s\n", what[report[0] >= 1 && report[0] <= 3 ? report[0] : 2],
                         subject ? subject : "", strerror(report[1]));
        int which = (p->flags & F_PTY) ? 0 : 1;
        if (!(p->flags & (which ? F_STDERR_NULL : F_STDOUT_NULL)))
            buf_put(&p->st[which].data, msg, (size_t)n);
        p->exit_value = (report[0] == 2 && report[1] == ENOENT) ? 127 : 126;
        p->exit_kind = EXIT_SPAWN_FAILED;
    }
    free((void *)p->spawn_cwd);
    free((void *)p->spawn_user);
    p->spawn_cwd = p->spawn_user = NULL;
    /* Suspended, nothing may be sent (a checkpoint would hold the frame, and a restored copy would send it to
     * its new daemon before HELLO): pump() sends it after the resume. */
    if (ctl >= 0 && suspended) p->started_pending = 1;
    else if (ctl >= 0) send_started(p);
}

/* ---------- sending ---------- */

static void queue_exit(struct proc *p) {
    frame_begin(MSG_EXIT);
    field_str(T_ID, p->id);
    field_u64(T_KIND, (uint64_t)p->exit_kind);
    field_u64(T_VALUE, (uint64_t)(int64_t)p->exit_value);
    frame_end();
    p->exit_sent = 1;
}

/* Turn buffered output, EOFs and exits into frames while the queue is short. */
static void pump(void) {
    if (ctl < 0 || suspended) return;
    for (struct proc *p = procs; p; p = p->next) {
        if (p->started_pending) { send_started(p); p->started_pending = 0; }  /* before its output and exit */
        for (int i = 0; i < 2; i++) {
            struct stream *s = &p->st[i];
            while (out.len < OUT_HIGH && s->sent < s->base + s->data.len) {
                uint64_t from = s->sent - s->base;
                uint64_t n = s->data.len - from;
                if (n > CHUNK) n = CHUNK;
                frame_begin(MSG_OUTPUT);
                field_str(T_ID, p->id);
                field_u64(T_FD, (uint64_t)(i + 1));
                field_u64(T_OFFSET, s->sent);
                field(T_DATA, buf_data(&s->data) + from, (uint32_t)n);
                frame_end();
                s->sent += n;
            }
            if (s->eof && !s->eof_sent && !s->eof_acked && s->sent == s->base + s->data.len &&
                out.len < OUT_HIGH) {
                frame_begin(MSG_EOF);
                field_str(T_ID, p->id);
                field_u64(T_FD, (uint64_t)(i + 1));
                field_u64(T_OFFSET, s->sent);
                frame_end();
                s->eof_sent = 1;
            }
        }
        if (p->exited && !p->exit_sent && !p->exit_acked && out.len < OUT_HIGH &&
            p->st[0].sent >= p->st[0].exit_mark && p->st[1].sent >= p->st[1].exit_mark)
            queue_exit(p);
    }
}

static void disconnect(void) {
    if (ctl >= 0) close(ctl);
    ctl = -1;
    suspended = parking = parked = 0;  /* a daemon that went away mid-snapshot took the snapshot with it */
    out.off = out.len = 0;
    in.off = in.len = 0;
    for (struct proc *p = procs; p; p = p->next) {
        for (int i = 0; i < 2; i++) { p->st[i].sent = p->st[i].base; p->st[i].eof_sent = 0; }
        p->exit_sent = 0;
    }
    now(&reconnect_at);
    reconnect_ms = 20;
}

/* Number every stream anew from what was not yet sent when the checkpoint was taken (the old daemon had all
 * that was sent: SUSPENDED came after it): that is the restored sandbox's output. */
static void rebase_for_restore(void) {
    for (struct proc *p = procs; p; p = p->next) {
        for (int i = 0; i < 2; i++) {
            struct stream *s = &p->st[i];
            uint64_t sent = s->sent - s->base;
            buf_drop(&s->data, sent > s->data.len ? s->data.len : sent);
            s->exit_mark = s->exit_mark > s->sent ? s->exit_mark - s->sent : 0;
            s->base = s->sent = 0;
            s->eof_sent = s->eof_acked = 0;
        }
        p->exit_sent = p->exit_acked = 0;
        p->stdin_offset = 0;
    }
}

static void send_hello(void) {
    uint64_t count = 0;
    for (struct proc *p = procs; p; p = p->next) count++;
    frame_begin(MSG_HELLO);
    field_u64(T_VERSION, AGENT_VERSION);
    field(T_TOKEN, token, (uint32_t)token_len);
    field_u64(T_VALUE, count);  /* this many STARTED frames follow */
    frame_end();
    for (struct proc *p = procs; p; p = p->next) {
        /* A T_PROC frame per process the agent still tracks. */
        frame_begin(MSG_STARTED);
        field_str(T_ID, p->id);
        field_u64(T_PID, (uint64_t)p->pid);
        field_u64(T_STATE, (uint64_t)p->exited);
        field_u64(T_OFFSET, p->stdin_offset);
        frame_end();
    }
}

static void read_ctl(int closing);

static void try_reconnect(void) {
    if (!reconnect_path || !token_len) return;
    if (parked && home_fd >= 0) {
        /* Restored from a checkpoint taken while parked: the new daemon's RESUME waits on home_fd (in the
         * snapshotted sandbox that descriptor's peer is long gone and it reads end-of-file). */
        char tmp[CHUNK];
        set_nonblock(home_fd);
        ssize_t r = read(home_fd, tmp, sizeof tmp);
        if (r > 0 && (ctl = fcntl(home_fd, F_DUPFD_CLOEXEC, 3)) >= 0) {
            parked = 0;  /* still suspended, until that RESUME */
            buf_put(&in, tmp, (size_t)r);
            read_ctl(0);
            return;
        }
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, reconnect_path, sizeof a.sun_path - 1);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0) {
        set_nonblock(fd);
        ctl = fd;
        /* Back from parking, the daemon has every byte sent before SUSPENDED: streams go on from there. */
        suspended = parked = 0;
        send_hello();
        return;
    }
    if (fd >= 0) close(fd);
    now(&reconnect_at);
    reconnect_at.tv_nsec += (long)reconnect_ms * 1000000;
    while (reconnect_at.tv_nsec >= 1000000000) { reconnect_at.tv_sec++; reconnect_at.tv_nsec -= 1000000000; }
    if (reconnect_ms < 500 && !parked) reconnect_ms *= 2;  /* parked: the daemon is back within moments */
}

/* ---------- handling daemon frames ---------- */

/* A terminal's rows or columns as asked for, if it is one a terminal can have; else ``keep``. */
static unsigned short window_side(uint64_t asked, unsigned short keep) {
    return asked >= 1 && asked <= 10000 ? (unsigned short)asked : keep;
}

static void handle_exec(struct fields f) {
    uint8_t tag; const char *v; uint32_t n;
    const char *id = NULL; uint32_t idlen = 0;
    size_t argc = 0, envc = 0;
    struct fields scan = f;
    while (next_field(&scan, &tag, &v, &n)) {
        if (tag == T_ARG) argc++;
        else if (tag == T_ENV) envc++;
    }
    char **argv = calloc(argc + 1, sizeof *argv), **envp = calloc(envc + 1, sizeof *envp);
    char *cwd = NULL, *user = NULL;
    int flags = 0;
    uint64_t timeout_ms = 0;
    struct winsize ws = {.ws_row = 24, .ws_col = 80};
    size_t ai = 0, ei = 0;
    if (!argv || !envp) die("out of memory");
    while (next_field(&f, &tag, &v, &n)) {
        switch (tag) {
        case T_ID: id = v; idlen = n; break;
        case T_ARG: argv[ai++] = strndup(v, n); break;
        case T_ENV: envp[ei++] = strndup(v, n); break;
        case T_CWD: free(cwd); cwd = strndup(v, n); break;
        case T_USER: free(user); user = strndup(v, n); break;
        case T_FLAGS: flags = (int)as_u64(v, n); break;
        case T_TIMEOUT_MS: timeout_ms = as_u64(v, n); break;
        case T_ROWS: ws.ws_row = window_side(as_u64(v, n), ws.ws_row); break;
        case T_COLS: ws.ws_col = window_side(as_u64(v, n), ws.ws_col); break;
        }
    }
    if (id && idlen > 0 && idlen <= MAX_ID && argc > 0 && !find_proc(id, idlen) &&
        !entrypoint_done)
        spawn(id, idlen, argv, envp, cwd, user, flags, timeout_ms, ws);
    for (size_t i = 0; i < ai; i++) free(argv[i]);
    for (size_t i = 0; i < ei; i++) free(envp[i]);
    free(argv); free(envp); free(cwd); free(user);
}

static void ack_stdin(struct proc *p) {
    if (ctl < 0 || suspended) return;
    /* After a restore, pending bytes can predate this sandbox's numbering (see rebase_for_restore). */
    uint64_t written = p->stdin_offset > p->stdin_pending.len ? p->stdin_offset - p->stdin_pending.len : 0;
    frame_begin(MSG_STDIN_ACK);
    field_str(T_ID, p->id);
    field_u64(T_OFFSET, written);
    frame_end();
}

static void close_stdin(struct proc *p) {
    if (p->stdin_fd >= 0 && !(p->flags & F_PTY)) close(p->stdin_fd);
    else if (p->stdin_fd >= 0) {
        char eot = 4;  /* a terminal's end of input */
        (void)!write(p->stdin_fd, &eot, 1);
        close(p->stdin_fd);
    }
    p->stdin_fd = -1;
}

static void flush_stdin(struct proc *p) {
    while (p->stdin_fd >= 0 && p->stdin_pending.len) {
        ssize_t w = write(p->stdin_fd, buf_data(&p->stdin_pending), p->stdin_pending.len);
        if (w > 0) { buf_drop(&p->stdin_pending, (size_t)w); continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) break;
        /* The reader went away: what is left can never be delivered. */
        buf_drop(&p->stdin_pending, p->stdin_pending.len);
        close_stdin(p);
    }
    if (p->stdin_fd >= 0 && p->stdin_eof && !p->stdin_pending.len) close_stdin(p);
    ack_stdin(p);
}

/* Create a directory and its parents, as the sandbox's root sees the tree. */
static void mkdir_p(const char *path) {
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf) return;
    memcpy(buf, path, n + 1);
    for (char *c = buf + 1; *c; c++) {
        if (*c != '/') continue;
        *c = 0;
        mkdir(buf, 0755);
        *c = '/';
    }
    mkdir(buf, 0755);
}

/* A warm pool's sandbox runs the default entrypoint before any request takes it; a request that wants another
 * one has it dropped first: killed, and gone without a word to the daemon (which never recorded it), so that
 * neither its exit nor its id stands in the way of the entrypoint that replaces it.  Its record outlives this
 * turn of the main loop, which may still hold pointers to it. */
static void forget(struct proc *p) {
    if (!p->exited) {
        kill(p->pid, SIGKILL);
        settle_spawn(p, 1);
        kill(-p->pid, SIGKILL);
    }
    if (p->flags & F_ENTRYPOINT) entrypoint_done = 0;  /* its exit, if it came, ended nothing yet */
    for (struct proc **pp = &procs; *pp; pp = &(*pp)->next)
        if (*pp == p) { *pp = p->next; break; }
    close_stdin(p);
    for (int i = 0; i < 2; i++) close_stream(&p->st[i]);
    p->next = forgotten;
    forgotten = p;
}

static void handle_frame(uint8_t type, struct fields f) {
    uint8_t tag; const char *v; uint32_t n;
    const char *id = NULL, *data = NULL; uint32_t idlen = 0, datalen = 0;
    uint64_t offset = 0, fd = 0, flags = 0, signo = 0, rows = 0, cols = 0;
    if (type == MSG_EXEC) { handle_exec(f); return; }
    while (next_field(&f, &tag, &v, &n)) {
        switch (tag) {
        case T_ID: id = v; idlen = n; break;
        case T_DATA: data = v; datalen = n; break;
        case T_OFFSET: offset = as_u64(v, n); break;
        case T_FD: fd = as_u64(v, n); break;
        case T_FLAGS: flags = as_u64(v, n); break;
        case T_SIGNO: signo = as_u64(v, n); break;
        case T_ROWS: rows = as_u64(v, n); break;
        case T_COLS: cols = as_u64(v, n); break;
        case T_TOKEN:
            if (type == MSG_INIT && n <= sizeof token) { memcpy(token, v, n); token_len = n; }
            break;
        case T_CWD:
            if (type == MSG_INIT && n < 4096) {
                char dir[4096];
                memcpy(dir, v, n);
                dir[n] = 0;
                mkdir_p(dir);
            }
            break;
        }
    }
    if (type == MSG_INIT) { send_hello(); return; }
    if (type == MSG_SUSPEND) {
        frame_begin(MSG_SUSPENDED);
        frame_end();
        suspended = 1;
        if (flags & F_PARK) parking = 1;
        return;
    }
    if (type == MSG_RESUME) {
        suspended = 0;
        if (flags & F_RESTORED) {
            /* A sandbox restored from a checkpoint: this connection is a new daemon's, which numbers every
             * stream from 0 and knows nothing of what the old one acknowledged. */
            out.off = out.len = 0;  /* (nothing should be left for the old connection, but it is not ours) */
            rebase_for_restore();
            send_hello();
        } else {
            for (struct proc *q = procs; q; q = q->next) ack_stdin(q);
        }
        return;
    }
    struct proc *p = id ? find_proc(id, idlen) : NULL;
    if (!p) return;
    switch (type) {
    case MSG_STDIN:
        /* Offsets make retries idempotent: keep only bytes not seen before. */
        if (offset <= p->stdin_offset && offset + datalen >= p->stdin_offset) {
            uint64_t skip = p->stdin_offset - offset;
            if (p->stdin_fd >= 0) buf_put(&p->stdin_pending, data + skip, datalen - skip);
            p->stdin_offset += datalen - skip;
            if (flags & F_EOF) p->stdin_eof = 1;
        }
        flush_stdin(p);
        break;
    case MSG_ACK:
        if (fd == 1 || fd == 2) {
            struct stream *s = &p->st[fd - 1];
            if (offset > s->base) {
                uint64_t drop = offset - s->base;
                if (drop > s->data.len) drop = s->data.len;
                buf_drop(&s->data, drop);
                s->base += drop;
            }
            if (flags & F_EOF) s->eof_acked = 1;
        }
        break;
    case MSG_SIGNAL:
        if (flags & F_FORGET) { forget(p); break; }
        /* Its process group exists once the child has exec'd (setsid() comes first). */
        if (!p->exited && signo > 0 && signo < NSIG) {
            if (signo == SIGKILL && p->spawn_fd >= 0) kill(p->pid, SIGKILL);  /* it may never get to its exec */
            settle_spawn(p, 1);
            kill(-p->pid, (int)signo);
        }
        break;
    case MSG_EXIT_ACK:
        p->exit_acked = 1;
        break;
    case MSG_RESIZE:
        /* The kernel tells the terminal's foreground process group (SIGWINCH) when the size changes. */
        if ((p->flags & F_PTY) && p->st[0].fd >= 0) {
            struct winsize ws = {.ws_row = window_side(rows, 0), .ws_col = window_side(cols, 0)};
            if (ws.ws_row && ws.ws_col) ioctl(p->st[0].fd, TIOCSWINSZ, &ws);
        }
        break;
    }
}

/* Read and act on what the daemon sent; ``closing``: the connection failed on a write, so end it after. */
static void read_ctl(int closing) {
    char tmp[CHUNK];
    int hung_up = closing;
    for (;;) {
        ssize_t r = read(ctl, tmp, sizeof tmp);
        if (r > 0) { buf_put(&in, tmp, (size_t)r); continue; }
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == EAGAIN) break;
        /* Frames read before the hang-up were sent by a daemon that counted on them (an EXEC it already
         * recorded): act on them first, and the reconnection's HELLO reports what they started. */
        hung_up = 1;
        break;
    }
    while (in.len >= 5) {
        uint32_t n;
        memcpy(&n, buf_data(&in), 4);
        if (n < 1 || n > MAX_FRAME) { disconnect(); return; }
        if (in.len < 4 + (size_t)n) break;
        struct fields f = {buf_data(&in) + 5, n - 1};
        handle_frame((uint8_t)buf_data(&in)[4], f);
        if (ctl < 0) return;
        buf_drop(&in, 4 + n);
    }
    if (hung_up && ctl >= 0) disconnect();
}

static void park(void) {
    close(ctl);
    ctl = -1;
    parking = 0;
    parked = 1;
    in.off = in.len = 0;
    now(&reconnect_at);
    reconnect_ms = 20;
}

static void write_ctl(void) {
    if (ctl >= 0 && parking && !out.len) { park(); return; }
    while (ctl >= 0 && out.len) {
        ssize_t w = send(ctl, buf_data(&out), out.len, MSG_NOSIGNAL);
        if (w > 0) { buf_drop(&out, (size_t)w); continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) return;
        /* The daemon is gone, but frames it sent may still wait unread (gVisor can report the failed write before
         * the data is readable): an EXEC it accepted must still start. */
        read_ctl(1);
    }
    if (ctl >= 0 && parking && !out.len) park();
}

/* ---------- exits and deadlines ---------- */

static void on_exit_status(struct proc *p, int status) {
    settle_spawn(p, 1);
    p->exited = 1;
    if (p->timed_out) { p->exit_kind = EXIT_TIMEOUT; p->exit_value = 0; }
    else if (p->exit_kind == EXIT_SPAWN_FAILED) { /* keep the 126/127 */ }
    else if (WIFSIGNALED(status)) { p->exit_kind = EXIT_SIGNAL; p->exit_value = WTERMSIG(status); }
    else { p->exit_kind = EXIT_CODE; p->exit_value = WEXITSTATUS(status); }
    if (p->flags & F_ENTRYPOINT) {
        /* The sandbox ends with its entrypoint: stop everything else now. */
        entrypoint_done = 1;
        kill(-1, SIGKILL);
    }
    for (int i = 0; i < 2; i++) {
        read_stream(&p->st[i]);
        p->st[i].exit_mark = p->st[i].base + p->st[i].data.len;
    }
}

static void reap(void) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (struct proc *p = procs; p; p = p->next)
            if (p->pid == pid && !p->exited) { on_exit_status(p, status); break; }
    }
}

static long check_deadlines(void) {
    long wait = -1;
    for (struct proc *p = procs; p; p = p->next) {
        if (!p->has_deadline || p->exited || p->timed_out) continue;
        long ms = ms_until(&p->deadline);
        if (ms <= 1) {
            /* A child that never got to its exec (stuck opening a hostile /etc/passwd, say) dies here, which
             * settles it, instead of holding the agent. */
            if (p->spawn_fd >= 0) kill(p->pid, SIGKILL);
            settle_spawn(p, 1);
            p->timed_out = 1;
            kill(-p->pid, SIGKILL);
            /* The output streams end at the deadline, whoever still holds them. */
            for (int i = 0; i < 2; i++) { read_stream(&p->st[i]); close_stream(&p->st[i]); }
            close_stdin(p);
        } else if (wait < 0 || ms < wait) {
            wait = ms;
        }
    }
    return wait;
}

/* Forget a process once the daemon has acknowledged its exit and both EOFs. */
static void free_finished(void) {
    while (forgotten) {
        struct proc *p = forgotten;
        forgotten = p->next;
        for (int i = 0; i < 2; i++) buf_free(&p->st[i].data);
        buf_free(&p->stdin_pending);
        free(p);
    }
    struct proc **pp = &procs;
    while (*pp) {
        struct proc *p = *pp;
        if (p->exit_acked && p->st[0].eof_acked && p->st[1].eof_acked &&
            !(p->flags & F_ENTRYPOINT)) {
            *pp = p->next;
            close_stdin(p);
            for (int i = 0; i < 2; i++) { close_stream(&p->st[i]); buf_free(&p->st[i].data); }
            buf_free(&p->stdin_pending);
            free(p);
        } else {
            pp = &p->next;
        }
    }
}

/* `shoal-agent probe tcp PORT`: a readiness probe.  Exit 0 once a connection to PORT on the sandbox's
 * loopback (IPv4, then IPv6) is accepted, 1 if refused, 2 for a bad port. */
static int probe_tcp(const char *port_text) {
    char *end;
    long port = strtol(port_text, &end, 10);
    if (!*port_text || *end || port < 1 || port > 65535) return 2;
    struct sockaddr_in v4 = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct sockaddr_in6 v6 = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port),
                              .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&v4, sizeof v4) == 0) return 0;
    fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&v6, sizeof v6) == 0) return 0;
    return 1;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "fs")) return fs_main(argc - 2, argv + 2);
    if (argc >= 2 && !strcmp(argv[1], "userns")) return userns_main(argc - 2, argv + 2);
    if (argc >= 2 && !strcmp(argv[1], "runsc-exec")) return runscexec_main(argc - 2, argv + 2);
    if (argc == 4 && !strcmp(argv[1], "probe") && !strcmp(argv[2], "tcp")) return probe_tcp(argv[3]);
    cmdline_area = argv[0];
    cmdline_len = (size_t)(argv[argc - 1] + strlen(argv[argc - 1]) + 1 - argv[0]);
    int initial_fd = -1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--fd")) initial_fd = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reconnect")) reconnect_path = argv[i + 1];
    }
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    signal(SIGPIPE, SIG_IGN);
    ignore_signals_from_inside();
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0) die("signalfd");
    if (initial_fd >= 0) {
        ctl = fcntl(initial_fd, F_DUPFD_CLOEXEC, 3);
        home_fd = fcntl(initial_fd, F_DUPFD_CLOEXEC, 3);
        close(initial_fd);
        if (ctl < 0 || home_fd < 0) die("control descriptor");
        set_nonblock(ctl);
        if (initial_fd <= 2) {
            /* Under gVisor the control socket arrives as stdin: leave no hole in 0-2, or the next open()
             * (a child's /dev/null) would land there and be overwritten by its own dup2()s. */
            int null_fd = open("/dev/null", O_RDWR);
            if (null_fd >= 0 && null_fd != initial_fd) {
                dup2(null_fd, initial_fd);
                close(null_fd);
            }
        }
    } else {
        disconnect();
    }

    struct pollfd *pfds = NULL;
    struct proc **owner = NULL;
    int *which = NULL;
    size_t cap = 0;
    for (;;) {
        pump();
        size_t nprocs = 0;
        for (struct proc *p = procs; p; p = p->next) nprocs++;
        if (cap < 2 + nprocs * 3) {
            cap = 2 + nprocs * 3 + 16;
            pfds = realloc(pfds, cap * sizeof *pfds);
            owner = realloc(owner, cap * sizeof *owner);
            which = realloc(which, cap * sizeof *which);
            if (!pfds || !owner || !which) die("out of memory");
        }
        size_t n = 0;
        pfds[n++] = (struct pollfd){.fd = sfd, .events = POLLIN};
        pfds[n++] = (struct pollfd){.fd = ctl, .events = (short)(POLLIN | (out.len ? POLLOUT : 0))};
        for (struct proc *p = procs; p; p = p->next) {
            if (p->spawn_fd >= 0) {
                /* Its output waits until its exec is settled (STARTED goes first). */
                owner[n] = p; which[n] = 3;
                pfds[n++] = (struct pollfd){.fd = p->spawn_fd, .events = POLLIN};
                continue;
            }
            for (int i = 0; i < 2; i++)
                if (p->st[i].fd >= 0 && p->st[i].data.len < STREAM_CAP) {
                    owner[n] = p; which[n] = i;
                    pfds[n++] = (struct pollfd){.fd = p->st[i].fd, .events = POLLIN};
                }
            if (p->stdin_fd >= 0 && p->stdin_pending.len) {
                owner[n] = p; which[n] = 2;
                pfds[n++] = (struct pollfd){.fd = p->stdin_fd, .events = POLLOUT};
            }
        }
        long timeout = check_deadlines();
        if (ctl < 0 && reconnect_path && token_len) {
            long ms = ms_until(&reconnect_at);
            if (ms <= 1) { try_reconnect(); continue; }
            if (timeout < 0 || ms < timeout) timeout = ms;
        }
        int r = poll(pfds, (nfds_t)n, (int)timeout);
        if (r < 0 && errno != EINTR) die("poll");
        if (r <= 0) continue;
        if (pfds[0].revents) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof si) > 0) {}
            reap();
        }
        if (ctl >= 0 && pfds[1].revents & (POLLIN | POLLHUP | POLLERR)) read_ctl(0);
        if (ctl >= 0 && pfds[1].revents & POLLOUT) write_ctl();
        for (size_t i = 2; i < n; i++) {
            if (!pfds[i].revents) continue;
            if (which[i] == 3) settle_spawn(owner[i], 0);
            else if (which[i] == 2) flush_stdin(owner[i]);
            else read_stream(&owner[i]->st[which[i]]);
        }
        pump();
        write_ctl();
        free_finished();
    }
}
