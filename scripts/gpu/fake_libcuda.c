/*
 * A stand-in libcuda.so.1 for rehearsing scripts/gpu-check on a machine without a GPU
 * (`SHOAL_GPU_CHECK_FAKE=1 scripts/gpu-check run`).  Never used on a real GPU machine.
 *
 * It implements the driver API calls cuda-probe makes, and behaves like the real driver where
 * shoal's passthrough matters: cuInit opens /dev/nvidiactl and every /dev/nvidiaN it finds (so a
 * missing node or device-cgroup rule fails it, as it would fail the real one), the devices it
 * counts are the /dev/nvidiaN nodes present, and their UUIDs are those in NVIDIA_VISIBLE_DEVICES,
 * in order.  The "kernel" runs on the CPU, computing what the PTX kernel computes.
 *
 * Build: cc -shared -fPIC -O2 -o libcuda.so.1 fake_libcuda.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int CUresult;
typedef struct { unsigned char bytes[16]; } CUuuid;

static int ndev;
static int minors[64];

CUresult cuGetErrorString(CUresult rc, const char **msg) {
    *msg = rc == 100 ? "no CUDA-capable device is detected (fake driver: a /dev/nvidia* node cannot be opened)"
                     : "fake driver error";
    return 0;
}

CUresult cuInit(unsigned flags) {
    (void)flags;
    int fd = open("/dev/nvidiactl", O_RDWR);
    if (fd < 0) return 100;
    close(fd);
    DIR *d = opendir("/dev");
    if (!d) return 100;
    struct dirent *e;
    while ((e = readdir(d)) && ndev < 64) {
        int minor;
        char rest;
        if (sscanf(e->d_name, "nvidia%d%c", &minor, &rest) != 1) continue;
        char path[300];
        snprintf(path, sizeof path, "/dev/%s", e->d_name);
        fd = open(path, O_RDWR);
        if (fd < 0) return 100;
        close(fd);
        minors[ndev++] = minor;
    }
    closedir(d);
    return ndev ? 0 : 100;
}

CUresult cuDriverGetVersion(int *v) { *v = 99000; return 0; }
CUresult cuDeviceGetCount(int *n) { *n = ndev; return 0; }
CUresult cuDeviceGet(int *dev, int i) { *dev = i; return i < ndev ? 0 : 101; }

CUresult cuDeviceGetName(char *name, int len, int dev) {
    snprintf(name, len, "Fake GPU (/dev/nvidia%d)", minors[dev]);
    return 0;
}

CUresult cuDeviceTotalMem_v2(size_t *mem, int dev) { (void)dev; *mem = (size_t)1 << 34; return 0; }

CUresult cuDeviceGetUuid(CUuuid *u, int dev) {
    const char *vis = getenv("NVIDIA_VISIBLE_DEVICES");
    memset(u, 0, sizeof *u);
    if (!vis) return 0;
    for (int i = 0; i < dev && vis; i++) vis = (vis = strchr(vis, ',')) ? vis + 1 : NULL;
    if (!vis || strncmp(vis, "GPU-", 4) != 0) return 0;
    const char *p = vis + 4;
    for (int i = 0; i < 16 && *p && *p != ','; p++) {
        if (*p == '-') continue;
        unsigned v;
        if (sscanf(p, "%2x", &v) != 1) break;
        u->bytes[i++] = (unsigned char)v;
        p++;
    }
    return 0;
}

CUresult cuCtxCreate_v2(void **ctx, unsigned flags, int dev) { (void)flags; (void)dev; *ctx = (void *)1; return 0; }
CUresult cuCtxSynchronize(void) { return 0; }
CUresult cuCtxDestroy_v2(void *ctx) { (void)ctx; return 0; }
CUresult cuModuleLoadData(void **mod, const void *image) {
    *mod = (void *)1;
    return strstr(image, ".entry square_plus") ? 0 : 200;
}
CUresult cuModuleGetFunction(void **fn, void *mod, const char *name) {
    (void)mod;
    *fn = (void *)1;
    return strcmp(name, "square_plus") == 0 ? 0 : 500;
}
CUresult cuMemAlloc_v2(unsigned long long *p, size_t size) {
    void *m = malloc(size);
    *p = (unsigned long long)m;
    return m ? 0 : 2;
}
CUresult cuMemFree_v2(unsigned long long p) { free((void *)p); return 0; }
CUresult cuMemcpyDtoH_v2(void *dst, unsigned long long src, size_t size) {
    memcpy(dst, (void *)src, size);
    return 0;
}
CUresult cuLaunchKernel(void *fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, void *stream, void **args, void **extra) {
    (void)fn; (void)gy; (void)gz; (void)by; (void)bz; (void)shared; (void)stream; (void)extra;
    unsigned *out = *(unsigned **)args[0];
    unsigned n = *(unsigned *)args[1];
    for (unsigned i = 0; i < gx * bx && i < n; i++) out[i] = i * i + 7u;
    return 0;
}
