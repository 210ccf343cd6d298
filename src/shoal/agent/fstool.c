/*
 * shoal-agent fs: the sandbox's side of shoal's filesystem API.
 *
 * `shoal-agent fs OP [OPTIONS] PATH` runs as an ordinary exec inside the
 * sandbox: in its mount namespace, as its root user, under its seccomp profile
 * and cgroup limits.  Every path therefore resolves in the sandbox's own root:
 * `..`, absolute symlinks, /proc/<pid>/root links and directories swapped for
 * symlinks all end inside the sandbox, and no host file is reachable from here
 * (the only host paths mounted in, /.shoal/bin and /.shoal/ctl, are
 * read-only).  That is the security argument of the whole filesystem API:
 * nothing on the host side ever resolves a sandbox path.
 *
 * Trust: this program trusts nothing it reads (its argv and stdin come from
 * the daemon, but code in the sandbox can tamper with any process here), and
 * what it prints is hostile input for the SDK, which parses it with bounds.
 * Inside the sandbox it is still careful to do what it says: whole-file writes
 * go to a temporary file in the target's directory, held by a descriptor, and
 * are renamed into place (a directory swapped for a symlink mid-write cannot
 * redirect them); recursive removal never follows a symlink (openat with
 * O_NOFOLLOW | O_DIRECTORY at every level).
 *
 * Ops.  Results go to stdout; an error is one JSON object on stderr,
 * {"error_kind": K, "errno": N, "message": M}, and exit status 1.
 *   read [-o OFFSET] [-n LENGTH] PATH   the file's bytes (LENGTH of them from OFFSET); then
 *                          {"bytes": N} on stderr
 *   write [-n SIZE] PATH   stdin becomes the file (parents created), atomically;
 *                          with -n, any length but SIZE aborts and changes nothing
 *   stat PATH              one JSON entry (lstat: a symlink describes itself)
 *   ls PATH                a JSON array of entries, sorted by name
 *   mkdir [-p] PATH        with -p: parents too, and an existing directory is fine
 *   rm [-r] PATH           a file, a symlink, an empty directory; -r: a whole tree
 *   watch [-r] [-t SECS] [-f TYPES] PATH   one JSON event per line, until stdin closes or SECS pass;
 *                          -f: only these event types (comma-separated, e.g. Create,Modify)
 *   open -m MODE PATH      a request/response session on stdin/stdout (see op_open)
 * With -x, PATH is hex-encoded (names that are not UTF-8 cannot travel as text).
 * read, write and open take regular files only: a FIFO, socket or device is
 * refused at once ("NotAFile", EINVAL) and never opened in a way that waits.
 *
 * JSON strings carry names as UTF-8; a byte that is not part of valid UTF-8 is
 * written as the escape \udcXX (Python's "surrogateescape"), so the SDK gets the
 * exact bytes back with os.fsencode().
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define IO_CHUNK (1 << 20)
#define MAX_HOPS 40
#define TABLE_BYTES (1 << 20) /* most of /etc/passwd or /etc/group we read */

/* ---------- output ---------- */

static char obuf[1 << 16];
static size_t olen;

static int write_all(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

static void oflush(void) {
    if (olen && write_all(1, obuf, olen) < 0) _exit(1);
    olen = 0;
}

static void oput(const void *p, size_t n) {
    if (olen + n > sizeof obuf) {
        oflush();
        if (n > sizeof obuf) {
            if (write_all(1, p, n) < 0) _exit(1);
            return;
        }
    }
    memcpy(obuf + olen, p, n);
    olen += n;
}

static void ostr(const char *s) { oput(s, strlen(s)); }

static void ofmt(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void ofmt(const char *fmt, ...) {
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0) oput(tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* Length of the valid UTF-8 sequence at s (n bytes available), or 0. */
static size_t utf8_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    if (c < 0xC2) return 0;
    if (c < 0xE0) return n >= 2 && (s[1] & 0xC0) == 0x80 ? 2 : 0;
    if (c < 0xF0) {
        if (n < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) return 0;
        if (c == 0xE0 && s[1] < 0xA0) return 0; /* overlong */
        if (c == 0xED && s[1] >= 0xA0) return 0; /* UTF-16 surrogates */
        return 3;
    }
    if (c < 0xF5) {
        if (n < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80) return 0;
        if (c == 0xF0 && s[1] < 0x90) return 0;  /* overlong */
        if (c == 0xF4 && s[1] >= 0x90) return 0; /* above U+10FFFF */
        return 4;
    }
    return 0;
}

/* A JSON string (quotes included) holding the bytes s[0..n). */
static void ojson(const char *str, size_t n) {
    const unsigned char *s = (const unsigned char *)str;
    oput("\"", 1);
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            oput(e, 2);
            i++;
        } else if (c == '\n') {
            oput("\\n", 2);
            i++;
        } else if (c == '\t') {
            oput("\\t", 2);
            i++;
        } else if (c < 0x20) {
            ofmt("\\u%04x", c);
            i++;
        } else {
            size_t k = utf8_len(s + i, n - i);
            if (k) {
                oput(s + i, k);
                i += k;
            } else {
                ofmt("\\udc%02x", c); /* surrogateescape */
                i++;
            }
        }
    }
    oput("\"", 1);
}

static void ojson_str(const char *s) { ojson(s, strlen(s)); }

/* ---------- errors ---------- */

static const char *kind_of(int e) {
    switch (e) {
    case ENOENT: return "NotFound";
    case EISDIR: return "IsDirectory";
    case ENOTDIR: return "NotDirectory";
    case EACCES: case EPERM: case EROFS: return "PermissionDenied";
    case EEXIST: return "PathAlreadyExists";
    case ENOTEMPTY: return "DirectoryNotEmpty";
    case EFBIG: return "FileTooLarge";
    case ENAMETOOLONG: return "NameTooLong";
    case ELOOP: return "TooManySymlinks";
    case ENOSPC: case EDQUOT: return "NoSpace";
    case EINVAL: return "InvalidArgument";
    case ECANCELED: return "Aborted";
    case EBUSY: return "Busy";
    default: return "Io";
    }
}

/* The error object (without a newline) into the output buffer. */
static void error_json(const char *kind, int err, const char *message) {
    ostr("{\"error_kind\":");
    ojson_str(kind ? kind : kind_of(err));
    ofmt(",\"errno\":%d,\"message\":", err);
    ojson_str(message);
    ostr("}");
}

static const char *temp_name; /* a temporary file to remove if we must give up */
static int temp_dir = -1;

/* Report an error on stderr and exit 1. */
static void fail_kind(const char *kind, int err, const char *message) __attribute__((noreturn));
static void fail_kind(const char *kind, int err, const char *message) {
    if (temp_name) unlinkat(temp_dir, temp_name, 0);
    oflush();
    olen = 0;
    error_json(kind, err, message);
    ostr("\n");
    (void)!write(2, obuf, olen);
    _exit(1);
}

static void fail(int err) __attribute__((noreturn));
static void fail(int err) { fail_kind(NULL, err, strerror(err)); }

static void on_signal(int sig) {
    if (temp_name) unlinkat(temp_dir, temp_name, 0);
    signal(sig, SIG_DFL);
    raise(sig);
}

static void grow_pipe(int fd) {
    /* Fewer, larger pipe transfers between this tool and the agent.  Best effort. */
    (void)fcntl(fd, F_SETPIPE_SZ, IO_CHUNK);
}

/* ---------- paths ---------- */

static char *decode_hex(const char *h) {
    size_t n = strlen(h);
    if (n % 2) fail_kind("InvalidPath", EINVAL, "malformed hex path");
    char *out = malloc(n / 2 + 1);
    if (!out) fail(ENOMEM);
    for (size_t i = 0; i < n / 2; i++) {
        unsigned v;
        if (sscanf(h + 2 * i, "%2x", &v) != 1 || !v) fail_kind("InvalidPath", EINVAL, "malformed hex path");
        out[i] = (char)v;
    }
    out[n / 2] = 0;
    return out;
}

/* Split path into its directory part (in dir, a buffer of PATH_MAX) and last component. */
static const char *split(const char *path, char *dir) {
    size_t n = strlen(path);
    if (n >= PATH_MAX) fail(ENAMETOOLONG);
    const char *slash = strrchr(path, '/');
    if (!slash) {
        strcpy(dir, ".");
        return path;
    }
    if (slash == path) strcpy(dir, "/");
    else {
        memcpy(dir, path, (size_t)(slash - path));
        dir[slash - path] = 0;
    }
    return slash + 1;
}

static int is_dot(const char *base) { return !*base || !strcmp(base, ".") || !strcmp(base, ".."); }

/* mkdir -p, following symlinks as path resolution does.  Returns 0 or an errno. */
static int make_dirs(const char *path) {
    char buf[PATH_MAX];
    size_t n = strlen(path);
    if (n >= sizeof buf) return ENAMETOOLONG;
    memcpy(buf, path, n + 1);
    for (char *c = buf + 1; *c; c++) {
        if (*c != '/' || c[-1] == '/') continue;
        *c = 0;
        if (mkdir(buf, 0777) < 0 && errno != EEXIST) return errno;
        *c = '/';
    }
    if (mkdir(buf, 0777) < 0 && errno != EEXIST) return errno;
    struct stat st;
    if (stat(buf, &st) < 0) return errno;
    return S_ISDIR(st.st_mode) ? 0 : EEXIST;
}

/* ---------- users and groups (from the sandbox's own /etc) ---------- */

struct idname { unsigned id; char name[64]; };
struct idtable { int loaded; size_t n; struct idname *e; };
static struct idtable users, groups;

static void load_table(struct idtable *t, const char *file) {
    t->loaded = 1;
    int fd = open(file, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return;
    char *buf = malloc(TABLE_BYTES + 1);
    size_t len = 0;
    ssize_t r;
    while (buf && len < TABLE_BYTES && (r = read(fd, buf + len, TABLE_BYTES - len)) > 0) len += (size_t)r;
    close(fd);
    if (!buf) return;
    buf[len] = 0;
    for (char *line = buf, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next) *next++ = 0;
        char *colon1 = strchr(line, ':');
        char *colon2 = colon1 ? strchr(colon1 + 1, ':') : NULL;
        if (!colon1 || !colon2 || colon1 - line >= 64 || colon1 == line) continue;
        char *end;
        unsigned long id = strtoul(colon2 + 1, &end, 10);
        if (end == colon2 + 1 || *end != ':' || id > UINT_MAX) continue;
        struct idname *e = realloc(t->e, (t->n + 1) * sizeof *e);
        if (!e) break;
        t->e = e;
        e[t->n].id = (unsigned)id;
        memcpy(e[t->n].name, line, (size_t)(colon1 - line));
        e[t->n].name[colon1 - line] = 0;
        t->n++;
    }
    free(buf);
}

static void oname(struct idtable *t, const char *file, unsigned id) {
    if (!t->loaded) load_table(t, file);
    for (size_t i = 0; i < t->n; i++)
        if (t->e[i].id == id) {
            ojson_str(t->e[i].name);
            return;
        }
    ofmt("\"%u\"", id);
}

/* ---------- entries ---------- */

/* One JSON entry for `name`, an entry of directory dirfd, with its lstat; its "path" is `dir`/`shown`, or `shown`
 * alone when `dir` is NULL. */
static void oentry(int dirfd, const char *name, const char *shown, const struct stat *st, const char *dir) {
    const char *type = S_ISLNK(st->st_mode) ? "symlink" : S_ISDIR(st->st_mode) ? "directory" : "file";
    ostr("{\"name\":");
    ojson_str(shown);
    ostr(",\"path\":");
    if (dir) {
        static char full[2 * PATH_MAX + 2];
        size_t n = strlen(dir);
        snprintf(full, sizeof full, "%s%s%s", dir, n && dir[n - 1] == '/' ? "" : "/", shown);
        ojson_str(full);
    } else {
        ojson_str(name);
    }
    ofmt(",\"type\":\"%s\",\"size\":%lld,\"mode\":%u,\"permissions\":\"%04o\",\"owner\":", type,
         (long long)st->st_size, (unsigned)st->st_mode, (unsigned)(st->st_mode & 07777));
    oname(&users, "/etc/passwd", st->st_uid);
    ostr(",\"group\":");
    oname(&groups, "/etc/group", st->st_gid);
    ofmt(",\"modified_time\":%lld.%09ld,\"symlink_target\":", (long long)st->st_mtim.tv_sec,
         st->st_mtim.tv_nsec);
    if (S_ISLNK(st->st_mode)) {
        char target[PATH_MAX];
        ssize_t n = readlinkat(dirfd, name, target, sizeof target);
        if (n >= 0) ojson(target, (size_t)n);
        else ostr("null");
    } else {
        ostr("null");
    }
    ostr("}");
}

static int op_stat(const char *path) {
    struct stat st;
    if (fstatat(AT_FDCWD, path, &st, AT_SYMLINK_NOFOLLOW) < 0) fail(errno);
    char dir[PATH_MAX];
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/') n--; /* "a/b/" names "b" */
    char trimmed[PATH_MAX];
    memcpy(trimmed, path, n);
    trimmed[n] = 0;
    const char *base = strcmp(trimmed, "/") ? split(trimmed, dir) : "/";
    oentry(AT_FDCWD, path, base, &st, NULL);
    ostr("\n");
    oflush();
    return 0;
}

static int cmp_names(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int op_ls(const char *path) {
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) fail(errno);
    DIR *d = fdopendir(fd);
    if (!d) fail(errno);
    size_t n = 0, cap = 0;
    char **names = NULL;
    struct dirent *e;
    errno = 0;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            names = realloc(names, cap * sizeof *names);
            if (!names) fail(ENOMEM);
        }
        if (!(names[n++] = strdup(e->d_name))) fail(ENOMEM);
    }
    if (errno) fail(errno);
    qsort(names, n, sizeof *names, cmp_names);
    ostr("[");
    int first = 1;
    for (size_t i = 0; i < n; i++) {
        struct stat st;
        if (fstatat(fd, names[i], &st, AT_SYMLINK_NOFOLLOW) < 0) continue; /* removed meanwhile */
        if (!first) ostr(",");
        first = 0;
        oentry(fd, names[i], names[i], &st, path);
    }
    ostr("]\n");
    oflush();
    return 0;
}

static int op_mkdir(const char *path, int parents) {
    if (parents) {
        int err = make_dirs(path);
        if (err == EEXIST) fail_kind(NULL, EEXIST, "path exists and is not a directory");
        if (err) fail(err);
        return 0;
    }
    if (mkdir(path, 0777) < 0) fail(errno);
    return 0;
}

/* ---------- remove ---------- */

/* Remove `name` in directory `parent` and everything under it, never following symlinks. */
static int remove_tree(int parent, const char *name, int depth) {
    if (depth > 4096) return ELOOP;
    int fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOTDIR || errno == ELOOP) return unlinkat(parent, name, 0) < 0 ? errno : 0;
        return errno;
    }
    DIR *d = fdopendir(fd);
    if (!d) {
        int err = errno;
        close(fd);
        return err;
    }
    /* Deleting while reading a directory may skip entries on some filesystems: go round again. */
    for (int pass = 0; pass < 8; pass++) {
        struct dirent *e;
        int removed = 0;
        rewinddir(d);
        while ((e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            int err;
            if (e->d_type == DT_DIR || e->d_type == DT_UNKNOWN) {
                err = remove_tree(fd, e->d_name, depth + 1);
            } else {
                err = unlinkat(fd, e->d_name, 0) < 0 ? errno : 0;
                if (err == EISDIR) err = remove_tree(fd, e->d_name, depth + 1);
            }
            if (err && err != ENOENT) {
                closedir(d);
                return err;
            }
            removed++;
        }
        if (!removed) break;
    }
    closedir(d);
    return unlinkat(parent, name, AT_REMOVEDIR) < 0 ? errno : 0;
}

static int op_rm(const char *path, int recursive) {
    struct stat st;
    if (fstatat(AT_FDCWD, path, &st, AT_SYMLINK_NOFOLLOW) < 0) fail(errno);
    if (!S_ISDIR(st.st_mode)) {
        if (unlink(path) < 0) fail(errno);
        return 0;
    }
    if (!recursive) {
        if (rmdir(path) < 0) fail(errno == EEXIST ? ENOTEMPTY : errno);
        return 0;
    }
    int err = remove_tree(AT_FDCWD, path, 0);
    if (err) fail(err);
    return 0;
}

/* ---------- special files ---------- */
/*
 * The file API reads and writes regular files only.  Opening a FIFO blocks
 * until a peer opens its other end, a socket cannot be opened at all, and a
 * device may do anything when opened or read (/dev/zero never ends).  So the
 * type is checked before the open (stat follows symlinks, as open does) and
 * again on the descriptor, which is opened O_NONBLOCK in case the path was
 * swapped for a FIFO in between: nothing here ever waits on a special file.
 */

static const char *special_kind(mode_t m) {
    if (S_ISFIFO(m)) return "a FIFO (named pipe)";
    if (S_ISSOCK(m)) return "a socket";
    if (S_ISCHR(m)) return "a character device";
    if (S_ISBLK(m)) return "a block device";
    return "a file of an unknown type";
}

/* The message for a path of type m that is neither a regular file nor a directory. */
static void special_message(mode_t m, char *msg, size_t n) {
    snprintf(msg, n, "Not a regular file (%s); the file API opens regular files only", special_kind(m));
}

static void fail_special(mode_t m) __attribute__((noreturn));
static void fail_special(mode_t m) {
    char msg[160];
    special_message(m, msg, sizeof msg);
    fail_kind("NotAFile", EINVAL, msg);
}

/* Fail unless path, if it exists, is a regular file (EISDIR for a directory). */
static void require_regular(const char *path) {
    struct stat st;
    if (stat(path, &st) < 0) return; /* the open reports it */
    if (S_ISDIR(st.st_mode)) fail(EISDIR);
    if (!S_ISREG(st.st_mode)) fail_special(st.st_mode);
}

/* ---------- read ---------- */

static int op_read(const char *path, long long offset, long long length) {
    require_regular(path);
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) fail(errno);
    struct stat st;
    if (fstat(fd, &st) < 0) fail(errno);
    if (S_ISDIR(st.st_mode)) fail(EISDIR);
    if (!S_ISREG(st.st_mode)) fail_special(st.st_mode);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    grow_pipe(1);
    posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    if (offset > 0 && lseek(fd, (off_t)offset, SEEK_SET) < 0) fail(errno);
    unsigned long long total = 0, limit = length >= 0 ? (unsigned long long)length : ~0ULL;
    int use_splice = 1;
    char *buf = NULL;
    while (total < limit) {
        size_t want = limit - total < IO_CHUNK ? (size_t)(limit - total) : IO_CHUNK;
        ssize_t r;
        if (use_splice) {
            r = splice(fd, NULL, 1, NULL, want, SPLICE_F_MORE);
            if (r < 0 && (errno == EINVAL || errno == ENOSYS)) {
                use_splice = 0;
                continue;
            }
        } else {
            if (!buf && !(buf = malloc(IO_CHUNK))) fail(ENOMEM);
            r = read(fd, buf, want);
            if (r > 0 && write_all(1, buf, (size_t)r) < 0) _exit(1);
        }
        if (r > 0) {
            total += (unsigned long long)r;
            continue;
        }
        if (r == 0) break;
        if (errno == EINTR) continue;
        if (errno == EPIPE) _exit(1);
        fail(errno);
    }
    dprintf(2, "{\"bytes\":%llu}\n", total);
    return 0;
}

/* ---------- write ---------- */

/* A fresh name for a temporary file beside the target. */
static void temp_name_for(char *buf, size_t size, int tries) {
    uint64_t r = 0;
    if (getrandom(&r, sizeof r, GRND_NONBLOCK) != sizeof r)
        r ^= (uint64_t)time(NULL) * 2654435761u + (uint64_t)getpid() + (uint64_t)tries;
    snprintf(buf, size, ".shoal-write-%016llx", (unsigned long long)r);
}

/* Where a filesystem has no O_TMPFILE (gVisor's), the data goes to a named temporary file, which a SIGKILL
   mid-write would leave behind.  A detached child holds the read end of a pipe and removes that file when the
   writer dies without saying it is done: the pipe's end of file is the only news that outlives a SIGKILL. */
static int janitor_fd = -1;

static void start_janitor(int dirfd, const char *tmp) {
    int p[2];
    if (pipe(p) < 0) return;
    pid_t c = fork();
    if (c < 0) {
        close(p[0]);
        close(p[1]);
        return;
    }
    if (c == 0) {
        setsid(); /* outlive a kill of the writer's process group */
        prctl(PR_SET_NAME, "fs-janitor");
        int null = open("/dev/null", O_RDWR | O_CLOEXEC);
        if (null >= 0) {
            /* Let go of the exec's stdin/stdout/stderr pipes so its streams end with the writer. */
            dup2(null, 0);
            dup2(null, 1);
            dup2(null, 2);
        }
        for (int fd = 3; fd < 1024; fd++)
            if (fd != p[0] && fd != dirfd) close(fd);
        char b;
        ssize_t n;
        do n = read(p[0], &b, 1);
        while (n < 0 && errno == EINTR);
        if (n == 0) unlinkat(dirfd, tmp, 0);
        _exit(0);
    }
    close(p[0]);
    janitor_fd = p[1];
}

static void dismiss_janitor(void) {
    if (janitor_fd < 0) return;
    /* The helper may be gone (code in the sandbox can kill it): the file is in place, so that is no failure. */
    signal(SIGPIPE, SIG_IGN);
    (void)!write(janitor_fd, "", 1);
    signal(SIGPIPE, SIG_DFL);
    close(janitor_fd);
    janitor_fd = -1;
}

static int op_write(const char *path, long long expect) {
    char dir[PATH_MAX], tmp[64];
    const char *base = split(path, dir);
    if (is_dot(base)) fail(EISDIR);
    int err = make_dirs(dir);
    if (err == EEXIST) err = ENOTDIR; /* a file where a parent directory should be */
    if (err) fail(err);
    int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0) fail(errno);
    /* Resolve symlinks at the last component ourselves: the file written is the link's target. */
    char name[PATH_MAX];
    strcpy(name, base);
    struct stat st;
    int exists = 0;
    for (int hops = 0;; hops++) {
        if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
            if (errno != ENOENT) fail(errno);
            break;
        }
        if (!S_ISLNK(st.st_mode)) {
            exists = 1;
            break;
        }
        if (hops >= MAX_HOPS) fail(ELOOP);
        char target[PATH_MAX], tdir[PATH_MAX];
        ssize_t n = readlinkat(dirfd, name, target, sizeof target - 1);
        if (n < 0) fail(errno);
        target[n] = 0;
        const char *tbase = split(target, tdir);
        if (is_dot(tbase)) fail(EISDIR);
        int next = openat(target[0] == '/' ? AT_FDCWD : dirfd, tdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (next < 0) fail(errno);
        close(dirfd);
        dirfd = next;
        memmove(name, tbase, strlen(tbase) + 1);
    }
    if (exists && S_ISDIR(st.st_mode)) fail(EISDIR);
    if (exists && !S_ISREG(st.st_mode)) fail_special(st.st_mode);

    /* The data goes to a file without a name (O_TMPFILE) where the filesystem allows it: if this process is
       killed mid-write (its daemon died and the next one ends it), nothing is left behind.  It gets a
       temporary name only once complete, for the rename over the target.  Where it does not (gVisor), the
       first IO_CHUNK bytes are held in memory before a named temporary file exists: a write that fits has that
       file only between its creation and its rename; a longer one gets a janitor (a fork: costly under gVisor,
       so not for every write). */
    int fd = openat(dirfd, ".", O_TMPFILE | O_WRONLY | O_CLOEXEC, 0666);
    int unnamed = fd >= 0;
    char *buf = NULL;
    long long total = 0;
    int done = 0; /* all the input is read (or more than expected) */
    if (!unnamed) {
        if (!(buf = malloc(IO_CHUNK))) fail(ENOMEM);
        while (!done && total < IO_CHUNK) {
            ssize_t r = read(0, buf + total, (size_t)(IO_CHUNK - total));
            if (r > 0) total += r;
            else if (r == 0) done = 1;
            else if (errno != EINTR) fail(errno);
            if (expect >= 0 && total > expect) done = 1;
        }
        for (int tries = 0; fd < 0; tries++) {
            temp_name_for(tmp, sizeof tmp, tries);
            fd = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
            if (fd < 0 && (errno != EEXIST || tries > 100)) fail(errno);
        }
        temp_dir = dirfd;
        temp_name = tmp;
        if (!done) start_janitor(dirfd, tmp);
        if (write_all(fd, buf, (size_t)total) < 0) fail(errno);
    }
    if (exists) {
        /* Replace the file, not its ownership and permissions. */
        (void)!fchown(fd, st.st_uid, st.st_gid);
        (void)!fchmod(fd, st.st_mode & 07777);
    }
    grow_pipe(0);
    int use_splice = 1;
    while (!done) {
        ssize_t r;
        if (use_splice) {
            r = splice(0, NULL, fd, NULL, IO_CHUNK, SPLICE_F_MOVE);
            if (r < 0 && (errno == EINVAL || errno == ENOSYS)) {
                use_splice = 0;
                continue;
            }
        } else {
            if (!buf && !(buf = malloc(IO_CHUNK))) fail(ENOMEM);
            r = read(0, buf, IO_CHUNK);
            if (r > 0 && write_all(fd, buf, (size_t)r) < 0) fail(errno);
        }
        if (r > 0) {
            total += r;
            if (expect >= 0 && total > expect) break;
            continue;
        }
        if (r == 0) break;
        if (errno == EINTR) continue;
        fail(errno);
    }
    if (expect >= 0 && total != expect) {
        char msg[160];
        snprintf(msg, sizeof msg, "the upload ended after %lld of %lld bytes; the file was left as it was", total,
                 expect);
        fail_kind(NULL, ECANCELED, msg);
    }
    if (unnamed) {
        char self[64];
        snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
        for (int tries = 0;; tries++) {
            temp_name_for(tmp, sizeof tmp, tries);
            if (linkat(AT_FDCWD, self, dirfd, tmp, AT_SYMLINK_FOLLOW) == 0) break;
            if (errno != EEXIST || tries > 100) fail(errno);
        }
        temp_dir = dirfd;
        temp_name = tmp;
    }
    if (close(fd) < 0) fail(errno);
    if (renameat(dirfd, tmp, dirfd, name) < 0) fail(errno);
    temp_name = NULL;
    dismiss_janitor();
    return 0;
}

/* ---------- watch ---------- */

struct watch { int wd; char *path; };
static struct watch *watches;
static size_t nwatches;
static uint32_t watch_mask;

static const char *watch_path(int wd) {
    for (size_t i = 0; i < nwatches; i++)
        if (watches[i].wd == wd) return watches[i].path;
    return NULL;
}

static void add_watch(int ino, const char *path) {
    int wd = inotify_add_watch(ino, path, watch_mask | IN_DONT_FOLLOW);
    if (wd < 0) return;
    for (size_t i = 0; i < nwatches; i++)
        if (watches[i].wd == wd) {
            free(watches[i].path);
            watches[i].path = strdup(path);
            return;
        }
    struct watch *w = realloc(watches, (nwatches + 1) * sizeof *w);
    if (!w) fail(ENOMEM);
    watches = w;
    watches[nwatches].wd = wd;
    watches[nwatches].path = strdup(path);
    nwatches++;
}

static void forget_watch(int wd) {
    for (size_t i = 0; i < nwatches; i++)
        if (watches[i].wd == wd) {
            free(watches[i].path);
            watches[i] = watches[--nwatches];
            return;
        }
}

static char *join(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p) fail(ENOMEM);
    memcpy(p, dir, a);
    size_t k = a;
    if (!a || dir[a - 1] != '/') p[k++] = '/';
    memcpy(p + k, name, b + 1);
    return p;
}

/* Watch a directory and, recursively, every directory below it (symlinks are not followed). */
static void add_tree(int ino, const char *path, int depth) {
    add_watch(ino, path);
    if (depth > 64) return;
    DIR *d = opendir(path);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_type != DT_DIR || !strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char *sub = join(path, e->d_name);
        add_tree(ino, sub, depth + 1);
        free(sub);
    }
    closedir(d);
}

static const char *event_filter; /* watch -f: the event types to report, comma-separated (NULL: all) */

static int wanted(const char *type) {
    if (!event_filter) return 1;
    size_t n = strlen(type);
    for (const char *p = event_filter; *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == n && !strncmp(p, type, n)) return 1;
        if (!end) break;
        p = end + 1;
    }
    return 0;
}

static void emit_event(const char *type, const char *a, const char *b) {
    if (!wanted(type)) return;
    ostr("{\"event_type\":\"");
    ostr(type);
    ostr("\",\"paths\":[");
    ojson_str(a);
    if (b) {
        ostr(",");
        ojson_str(b);
    }
    ostr("]}\n");
}

static int op_watch(const char *path, int recursive, long timeout_s) {
    struct stat st;
    if (stat(path, &st) < 0) fail(errno); /* a symlink is followed, as Modal does */
    int ino = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (ino < 0) fail(errno);
    char real[PATH_MAX];
    if (!realpath(path, real)) fail(errno);
    watch_mask = IN_CREATE | IN_DELETE | IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_ACCESS |
                 IN_DELETE_SELF | IN_MOVE_SELF;
    int is_dir = S_ISDIR(st.st_mode);
    if (is_dir && recursive) add_tree(ino, real, 0);
    else add_watch(ino, real);
    if (!nwatches) fail(errno ? errno : EINVAL);
    /* The watch is in place: say so, so callers can act knowing no event will be missed. */
    ostr("{\"ready\":true}\n");
    oflush();

    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += timeout_s;
    char buf[64 * 1024] __attribute__((aligned(__alignof__(struct inotify_event))));
    char *moved_from = NULL;
    uint32_t moved_cookie = 0;
    for (;;) {
        int wait_ms = -1;
        if (timeout_s > 0) {
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            long long ms = (deadline.tv_sec - now.tv_sec) * 1000LL + (deadline.tv_nsec - now.tv_nsec) / 1000000;
            if (ms <= 0) break;
            wait_ms = ms > INT_MAX ? INT_MAX : (int)ms;
        }
        if (moved_from && (wait_ms < 0 || wait_ms > 50)) wait_ms = 50; /* a rename's other half comes at once */
        struct pollfd p[2] = {{.fd = ino, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
        int r = poll(p, 2, wait_ms);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) fail(errno);
        if (p[1].revents) {
            char junk[256];
            ssize_t n = read(0, junk, sizeof junk);
            if (n <= 0 && !(n < 0 && errno == EINTR)) break; /* stdin closed: the caller stopped watching */
        }
        if (r == 0 && moved_from) {
            emit_event("Remove", moved_from, NULL); /* moved out of what we watch */
            free(moved_from);
            moved_from = NULL;
        }
        if (!(p[0].revents & POLLIN)) {
            oflush();
            continue;
        }
        ssize_t len = read(ino, buf, sizeof buf);
        if (len <= 0) continue;
        int root_gone = 0;
        for (char *c = buf; c < buf + len;) {
            struct inotify_event *ev = (struct inotify_event *)c;
            c += sizeof *ev + ev->len;
            const char *dir = watch_path(ev->wd);
            if (!dir) continue;
            char *full = ev->len ? join(dir, ev->name) : strdup(dir);
            if (!full) fail(ENOMEM);
            if (moved_from && !((ev->mask & IN_MOVED_TO) && ev->cookie == moved_cookie)) {
                emit_event("Remove", moved_from, NULL);
                free(moved_from);
                moved_from = NULL;
            }
            if (ev->mask & IN_MOVED_FROM) {
                moved_from = full;
                moved_cookie = ev->cookie;
                continue;
            }
            if (ev->mask & IN_MOVED_TO) {
                if (moved_from) {
                    emit_event("Modify", moved_from, full);
                    free(moved_from);
                    moved_from = NULL;
                } else {
                    emit_event("Create", full, NULL);
                }
                if (recursive && (ev->mask & IN_ISDIR)) add_tree(ino, full, 0);
            } else if (ev->mask & IN_CREATE) {
                emit_event("Create", full, NULL);
                if (recursive && (ev->mask & IN_ISDIR)) add_tree(ino, full, 0);
            } else if (ev->mask & (IN_DELETE | IN_DELETE_SELF)) {
                /* A watched subdirectory's own deletion was already reported by its parent. */
                if (ev->len || !strcmp(dir, real)) emit_event("Remove", full, NULL);
                if ((ev->mask & IN_DELETE_SELF) && !strcmp(dir, real)) root_gone = 1;
            } else if (ev->mask & IN_MOVE_SELF) {
                if (!strcmp(dir, real)) {
                    emit_event("Remove", full, NULL);
                    root_gone = 1;
                }
            } else if (ev->mask & (IN_MODIFY | IN_ATTRIB)) {
                emit_event("Modify", full, NULL);
            } else if ((ev->mask & IN_ACCESS) && !(ev->mask & IN_ISDIR)) {
                emit_event("Access", full, NULL); /* (a directory's listing, ours included, is no event) */
            } else if (ev->mask & IN_IGNORED) {
                forget_watch(ev->wd);
            }
            free(full);
        }
        oflush();
        if (root_gone) break;
    }
    if (moved_from) emit_event("Remove", moved_from, NULL);
    oflush();
    return 0;
}

/* ---------- open: a session on one open file ---------- */
/*
 * After the open, requests arrive on stdin and each gets a response on stdout.
 * Request:  u8 op | u8 whence | u64 arg | u32 len | len bytes (only for 'w'), little-endian
 *   'r' read up to arg bytes (arg = 2^64-1: to the end)   'l' read a line (at most arg bytes)
 *   'w' write the len bytes that follow                   's' seek to arg (signed) from whence
 *   'f' flush                                             'c' close, and exit
 * Response: one or more records  u8 type | u32 len | payload
 *   'D' data (part of a read's answer), then 'K' with a u64 (bytes read or written, the new
 *   position) ends every answer, or 'E' with a JSON error (the file stays open).
 * The open itself is answered the same way before the first request.  EOF on stdin closes.
 */

static void record(char type, const void *payload, uint32_t n) {
    char head[5];
    head[0] = type;
    memcpy(head + 1, &n, 4);
    oput(head, 5);
    oput(payload, n);
}

static void answer_ok(uint64_t value) {
    record('K', &value, 8);
    oflush();
}

static void answer_error_kind(const char *kind, int err, const char *message) {
    oflush(); /* the record is assembled at the start of the (empty) buffer */
    char head[5] = {'E', 0, 0, 0, 0};
    oput(head, 5);
    error_json(kind, err, message);
    uint32_t n = (uint32_t)(olen - 5);
    memcpy(obuf + 1, &n, 4);
    oflush();
}

static void answer_error(int err) { answer_error_kind(NULL, err, strerror(err)); }

static void answer_special(mode_t m) {
    char msg[160];
    special_message(m, msg, sizeof msg);
    answer_error_kind("NotAFile", EINVAL, msg);
}

static int read_full(int fd, void *p, size_t n) {
    char *c = p;
    while (n) {
        ssize_t r = read(fd, c, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        c += r;
        n -= (size_t)r;
    }
    return 0;
}

static void send_data(const char *data, size_t n) {
    /* Large payloads bypass the output buffer. */
    if (n > 4096) {
        oflush();
        char head[5] = {'D'};
        uint32_t len = (uint32_t)n;
        memcpy(head + 1, &len, 4);
        if (write_all(1, head, 5) < 0 || write_all(1, data, n) < 0) _exit(1);
    } else {
        record('D', data, (uint32_t)n);
    }
}

static void do_read(int fd, uint64_t limit, int line, char *buf) {
    uint64_t total = 0;
    int seekable = lseek(fd, 0, SEEK_CUR) >= 0;
    while (total < limit) {
        size_t want = limit - total < IO_CHUNK ? (size_t)(limit - total) : IO_CHUNK;
        if (line && !seekable) want = 1;
        else if (line && want > 65536) want = 65536;
        ssize_t r = read(fd, buf, want);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            answer_error(errno);
            return;
        }
        if (r == 0) break;
        size_t keep = (size_t)r;
        int done = 0;
        if (line) {
            char *nl = memchr(buf, '\n', (size_t)r);
            if (nl) {
                keep = (size_t)(nl - buf) + 1;
                done = 1;
                if (keep < (size_t)r) lseek(fd, -(off_t)((size_t)r - keep), SEEK_CUR);
            }
        }
        send_data(buf, keep);
        total += keep;
        if (done) break;
    }
    answer_ok(total);
}

static int op_open(const char *path, const char *mode) {
    int plus = strchr(mode, '+') != NULL, flags;
    const char *kind = strpbrk(mode, "rwax");
    switch (kind ? *kind : 0) {
    case 'r': flags = plus ? O_RDWR : O_RDONLY; break;
    case 'w': flags = (plus ? O_RDWR : O_WRONLY) | O_CREAT | O_TRUNC; break;
    case 'a': flags = (plus ? O_RDWR : O_WRONLY) | O_CREAT | O_APPEND; break;
    case 'x': flags = (plus ? O_RDWR : O_WRONLY) | O_CREAT | O_EXCL; break;
    default: answer_error(EINVAL); return 1;
    }
    grow_pipe(0);
    grow_pipe(1);
    struct stat st;
    /* Only regular files (see "special files"); with 'x' an existing path of any type is EEXIST. */
    if (*kind != 'x' && stat(path, &st) == 0 && !S_ISREG(st.st_mode)) {
        if (S_ISDIR(st.st_mode)) answer_error(EISDIR);
        else answer_special(st.st_mode);
        return 1;
    }
    int fd = open(path, flags | O_CLOEXEC | O_NOCTTY | O_NONBLOCK, 0666);
    if (fd < 0) {
        int err = errno;
        /* ENXIO: a socket, or a FIFO without a reader, put there since the check */
        if (err == ENXIO && stat(path, &st) == 0 && !S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode))
            answer_special(st.st_mode);
        else
            answer_error(err);
        return 1;
    }
    if (fstat(fd, &st) < 0) {
        int err = errno;
        close(fd);
        answer_error(err);
        return 1;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        if (S_ISDIR(st.st_mode)) answer_error(EISDIR);
        else answer_special(st.st_mode);
        return 1;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    answer_ok(0);
    char *buf = malloc(IO_CHUNK);
    if (!buf) fail(ENOMEM);
    for (;;) {
        unsigned char head[14];
        if (read_full(0, head, sizeof head) < 0) break;
        char op = (char)head[0];
        int whence = head[1];
        uint64_t arg;
        uint32_t len;
        memcpy(&arg, head + 2, 8);
        memcpy(&len, head + 10, 4);
        switch (op) {
        case 'r':
        case 'l':
            do_read(fd, arg, op == 'l', buf);
            break;
        case 'w': {
            int err = 0;
            uint32_t left = len;
            while (left) {
                size_t want = left < IO_CHUNK ? left : IO_CHUNK;
                if (read_full(0, buf, want) < 0) _exit(1); /* the caller went away mid-request */
                left -= (uint32_t)want;
                if (!err && write_all(fd, buf, want) < 0) err = errno;
            }
            if (err) answer_error(err);
            else answer_ok(len);
            break;
        }
        case 's': {
            if (whence > 2) {
                answer_error(EINVAL);
                break;
            }
            off_t pos = lseek(fd, (off_t)(int64_t)arg, whence);
            if (pos < 0) answer_error(errno);
            else answer_ok((uint64_t)pos);
            break;
        }
        case 'f':
            answer_ok(0);
            break;
        case 'c':
            if (close(fd) < 0) answer_error(errno);
            else answer_ok(0);
            return 0;
        default:
            answer_error(EINVAL);
            return 1;
        }
    }
    close(fd);
    return 0;
}

/* ---------- entry ---------- */

static void usage(void) __attribute__((noreturn));
static void usage(void) {
    fail_kind("Usage", EINVAL,
              "usage: shoal-agent fs read|write|stat|ls|mkdir|rm|watch|open [-p] [-r] [-x] [-n SIZE] [-o OFFSET] "
              "[-t SECS] [-m MODE] PATH");
}

int fs_main(int argc, char **argv) {
    if (argc < 2) usage();
    const char *op = argv[0];
    int parents = 0, recursive = 0, hex = 0;
    long long size = -1, offset = 0;
    long timeout_s = 0;
    const char *mode = NULL;
    int i = 1;
    for (; i < argc - 1; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--")) {
            i++;
            break;
        }
        if (!strcmp(a, "-p")) parents = 1;
        else if (!strcmp(a, "-r")) recursive = 1;
        else if (!strcmp(a, "-x")) hex = 1;
        else if (!strcmp(a, "-n") && i + 1 < argc - 1) size = atoll(argv[++i]);
        else if (!strcmp(a, "-o") && i + 1 < argc - 1) offset = atoll(argv[++i]);
        else if (!strcmp(a, "-t") && i + 1 < argc - 1) timeout_s = atol(argv[++i]);
        else if (!strcmp(a, "-m") && i + 1 < argc - 1) mode = argv[++i];
        else if (!strcmp(a, "-f") && i + 1 < argc - 1) event_filter = argv[++i];
        else usage();
    }
    if (i != argc - 1) usage();
    const char *path = hex ? decode_hex(argv[i]) : argv[i];
    if (strlen(path) >= PATH_MAX) fail(ENAMETOOLONG);

    signal(SIGPIPE, SIG_DFL);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    signal(SIGHUP, on_signal);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max; /* deep trees hold a descriptor per level */
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    if (!strcmp(op, "read")) return op_read(path, offset, size);
    if (!strcmp(op, "write")) return op_write(path, size);
    if (!strcmp(op, "stat")) return op_stat(path);
    if (!strcmp(op, "ls")) return op_ls(path);
    if (!strcmp(op, "mkdir")) return op_mkdir(path, parents);
    if (!strcmp(op, "rm")) return op_rm(path, recursive);
    if (!strcmp(op, "watch")) return op_watch(path, recursive, timeout_s);
    if (!strcmp(op, "open") && mode) return op_open(path, mode);
    usage();
}
