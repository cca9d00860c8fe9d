/* Run a process on the int8 kernels of a CPU without AVX-512 and VNNI, on a CPU that has them.
 *
 * int8 runtimes pick their kernels from CPUID at start: ONNX Runtime's u8 x s8 GEMM uses VNNI
 * (vpdpbusd, exact) where the CPU has it and AVX2's vpmaddubsw (pairs saturate at int16) where it does
 * not, so an int8 model can agree with fp32 on one CPU and not on another. Loaded with LD_PRELOAD, this
 * library makes CPUID fault (Linux arch_prctl ARCH_SET_CPUID; needs the `cpuid_fault` CPU flag), answers
 * each fault with the real CPUID minus the AVX-512, VNNI, BF16 and AMX bits, and so lets the export and
 * the benches measure what those CPUs compute, with their real kernels, on this machine.
 *
 *   LD_PRELOAD=build/cpuid_mask.so python -m bench.int8_bench
 *
 * Limits: only code that asks CPUID after this library loads is affected (glibc's own string functions
 * chose theirs before); timings are AVX2 code on this core, not on an older CPU.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static long cpuid_faults(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0UL : 1UL); }

/* leaf 7 subleaf 0: AVX512F/DQ/IFMA/PF/ER/CD/BW/VL (ebx); VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ (ecx);
   4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, AVX512-FP16, AMX-TILE, AMX-INT8 (edx) */
#define EBX7 ((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31))
#define ECX7 ((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14))
#define EDX7 ((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25))
/* leaf 7 subleaf 1: AVX-VNNI, AVX512-BF16 (eax); AVX-VNNI-INT8, AVX-NE-CONVERT (edx) */
#define EAX71 ((1u << 4) | (1u << 5))
#define EDX71 ((1u << 4) | (1u << 5))

static void on_segv(int sig, siginfo_t *info, void *context) {
    (void)sig;
    ucontext_t *uc = (ucontext_t *)context;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (info->si_code != SI_KERNEL || ip[0] != 0x0f || ip[1] != 0xa2) {
        signal(SIGSEGV, SIG_DFL); /* a real fault: returning re-runs it and it kills as it would have */
        return;
    }
    unsigned leaf = (unsigned)r[REG_RAX], sub = (unsigned)r[REG_RCX], a, b, c, d;
    cpuid_faults(0);
    __cpuid_count(leaf, sub, a, b, c, d);
    cpuid_faults(1);
    if (leaf == 7 && sub == 0) {
        b &= ~EBX7;
        c &= ~ECX7;
        d &= ~EDX7;
    } else if (leaf == 7 && sub == 1) {
        a &= ~EAX71;
        d &= ~EDX71;
    }
    r[REG_RAX] = a;
    r[REG_RBX] = b;
    r[REG_RCX] = c;
    r[REG_RDX] = d;
    r[REG_RIP] += 2;
}

__attribute__((constructor)) static void mask_cpuid(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, NULL);
    if (cpuid_faults(1) != 0) {
        static const char msg[] = "cpuid_mask: this CPU or kernel cannot fault on CPUID (no cpuid_fault flag)\n";
        ssize_t ignored = write(2, msg, sizeof msg - 1);
        (void)ignored;
        _exit(3);
    }
}
