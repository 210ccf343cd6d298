/*
 * cuda-probe: a CUDA program for scripts/gpu-check, run inside a GPU sandbox.
 *
 * Loads the host driver's libcuda.so.1 (mounted by shoal under /.shoal/nvidia/lib, found through
 * LD_LIBRARY_PATH), lists the devices CUDA sees with name, memory and UUID, then JIT-compiles a
 * small PTX kernel, runs it on device 0 over a million elements and checks every result on the
 * host.  It needs only glibc: no CUDA toolkit, no headers (the few driver API types are declared
 * here, as in cuda.h).
 *
 * Output (stdout), one fact per line:
 *   driver <version>
 *   devices <count>
 *   device <i> <uuid> <total MiB> <name>
 *   kernel ok <elements> <milliseconds>
 * Exit status: 0 when everything ran and checked out; 2 when libcuda cannot be loaded; 1 otherwise.
 *
 * Build: cc -O2 -o cuda-probe cuda_probe.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef void *CUmodule;
typedef void *CUfunction;
typedef void *CUstream;
typedef unsigned long long CUdeviceptr;
typedef struct { unsigned char bytes[16]; } CUuuid;

/* out[i] = i*i + 7 for i < n (32-bit arithmetic). */
static const char PTX[] =
    ".version 7.0\n"
    ".target sm_70\n"
    ".address_size 64\n"
    ".visible .entry square_plus(.param .u64 out, .param .u32 n)\n"
    "{\n"
    "    .reg .pred %p<2>;\n"
    "    .reg .b32 %r<8>;\n"
    "    .reg .b64 %rd<5>;\n"
    "    ld.param.u64 %rd1, [out];\n"
    "    ld.param.u32 %r1, [n];\n"
    "    mov.u32 %r2, %ctaid.x;\n"
    "    mov.u32 %r3, %ntid.x;\n"
    "    mov.u32 %r4, %tid.x;\n"
    "    mad.lo.s32 %r5, %r2, %r3, %r4;\n"
    "    setp.ge.u32 %p1, %r5, %r1;\n"
    "    @%p1 bra DONE;\n"
    "    cvta.to.global.u64 %rd2, %rd1;\n"
    "    mul.wide.u32 %rd3, %r5, 4;\n"
    "    add.s64 %rd4, %rd2, %rd3;\n"
    "    mul.lo.s32 %r6, %r5, %r5;\n"
    "    add.s32 %r7, %r6, 7;\n"
    "    st.global.u32 [%rd4], %r7;\n"
    "DONE:\n"
    "    ret;\n"
    "}\n";

static void *lib;
static CUresult (*p_cuGetErrorString)(CUresult, const char **);

static void *sym(const char *name) {
    void *f = dlsym(lib, name);
    if (!f) {
        fprintf(stderr, "libcuda has no %s\n", name);
        exit(1);
    }
    return f;
}

static void check(CUresult rc, const char *what) {
    if (rc == 0) return;
    const char *msg = "unknown error";
    if (p_cuGetErrorString) p_cuGetErrorString(rc, &msg);
    fprintf(stderr, "%s failed: error %d (%s)\n", what, rc, msg);
    exit(1);
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int main(void) {
    lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "cannot load libcuda.so.1: %s\n", dlerror());
        return 2;
    }
    p_cuGetErrorString = (CUresult(*)(CUresult, const char **))dlsym(lib, "cuGetErrorString");
    CUresult (*cuInit)(unsigned) = sym("cuInit");
    CUresult (*cuDriverGetVersion)(int *) = sym("cuDriverGetVersion");
    CUresult (*cuDeviceGetCount)(int *) = sym("cuDeviceGetCount");
    CUresult (*cuDeviceGet)(CUdevice *, int) = sym("cuDeviceGet");
    CUresult (*cuDeviceGetName)(char *, int, CUdevice) = sym("cuDeviceGetName");
    CUresult (*cuDeviceTotalMem)(size_t *, CUdevice) = sym("cuDeviceTotalMem_v2");
    CUresult (*cuDeviceGetUuid)(CUuuid *, CUdevice) = sym("cuDeviceGetUuid");
    CUresult (*cuCtxCreate)(CUcontext *, unsigned, CUdevice) = sym("cuCtxCreate_v2");
    CUresult (*cuCtxSynchronize)(void) = sym("cuCtxSynchronize");
    CUresult (*cuCtxDestroy)(CUcontext) = sym("cuCtxDestroy_v2");
    CUresult (*cuModuleLoadData)(CUmodule *, const void *) = sym("cuModuleLoadData");
    CUresult (*cuModuleGetFunction)(CUfunction *, CUmodule, const char *) = sym("cuModuleGetFunction");
    CUresult (*cuMemAlloc)(CUdeviceptr *, size_t) = sym("cuMemAlloc_v2");
    CUresult (*cuMemFree)(CUdeviceptr) = sym("cuMemFree_v2");
    CUresult (*cuMemcpyDtoH)(void *, CUdeviceptr, size_t) = sym("cuMemcpyDtoH_v2");
    CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                               CUstream, void **, void **) = sym("cuLaunchKernel");

    check(cuInit(0), "cuInit");
    int version = 0, count = 0;
    check(cuDriverGetVersion(&version), "cuDriverGetVersion");
    printf("driver %d.%d\n", version / 1000, (version % 1000) / 10);
    check(cuDeviceGetCount(&count), "cuDeviceGetCount");
    printf("devices %d\n", count);
    if (count < 1) return 1;
    for (int i = 0; i < count; i++) {
        CUdevice dev;
        char name[256] = {0};
        size_t mem = 0;
        CUuuid u;
        check(cuDeviceGet(&dev, i), "cuDeviceGet");
        check(cuDeviceGetName(name, sizeof name - 1, dev), "cuDeviceGetName");
        check(cuDeviceTotalMem(&mem, dev), "cuDeviceTotalMem");
        check(cuDeviceGetUuid(&u, dev), "cuDeviceGetUuid");
        const unsigned char *b = u.bytes;
        printf("device %d GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x %zu %s\n", i, b[0],
               b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15],
               mem >> 20, name);
    }

    CUdevice dev;
    CUcontext ctx;
    CUmodule mod;
    CUfunction fn;
    CUdeviceptr out;
    unsigned n = 1u << 20;
    check(cuDeviceGet(&dev, 0), "cuDeviceGet");
    check(cuCtxCreate(&ctx, 0, dev), "cuCtxCreate");
    double t0 = now_ms();
    check(cuModuleLoadData(&mod, PTX), "cuModuleLoadData (PTX JIT)");
    check(cuModuleGetFunction(&fn, mod, "square_plus"), "cuModuleGetFunction");
    check(cuMemAlloc(&out, (size_t)n * 4), "cuMemAlloc");
    void *args[] = {&out, &n};
    check(cuLaunchKernel(fn, (n + 255) / 256, 1, 1, 256, 1, 1, 0, NULL, args, NULL), "cuLaunchKernel");
    check(cuCtxSynchronize(), "cuCtxSynchronize");
    uint32_t *host = malloc((size_t)n * 4);
    if (!host) return 1;
    check(cuMemcpyDtoH(host, out, (size_t)n * 4), "cuMemcpyDtoH");
    double t1 = now_ms();
    for (unsigned i = 0; i < n; i++) {
        if (host[i] != i * i + 7u) {
            fprintf(stderr, "kernel result wrong at %u: %u, expected %u\n", i, host[i], i * i + 7u);
            return 1;
        }
    }
    printf("kernel ok %u %.3f\n", n, t1 - t0);
    check(cuMemFree(out), "cuMemFree");
    check(cuCtxDestroy(ctx), "cuCtxDestroy");
    free(host);
    return 0;
}
