/*
 * jobservice-launch: what a local job's member runs first, started by the worker with vfork.
 *
 *     jobservice-launch <worker pid> <cgroup.procs of the member's leaf, or -> <program> [arguments...]
 *
 * Python cannot run code between vfork and exec, and a preexec_fn forces a real fork() of the (large)
 * worker. This program does in one exec what `sh -c 'echo 0 > cgroup.procs; exec "$@"'` and
 * `setpriv --pdeathsig KILL --` did in two (about 1 ms of CPU per member less, see workers/executors/launcher.py):
 *
 * 1. joins the member's cgroup, so that nothing of the member runs outside it; exit 125 with a line on
 *    stderr (the job's log) if it cannot, as `env` and `timeout` report their own failures;
 * 2. sets PR_SET_PDEATHSIG to SIGKILL, so that the member dies with its worker, and exits 125 if the worker
 *    died before that (the death signal would never come);
 * 3. execs the program (a path, already resolved by the worker), as execvp does: a script without a
 *    `#!` line runs under /bin/sh. 127 and a line on stderr if that fails.
 *
 * Built with -DJOBSERVICE_NOLIBC (x86-64 and arm64 Linux) it needs no C library: its own entry point and raw
 * system calls. A C library's start-up detects the CPU's features with CPUID, which a virtual machine traps
 * to its hypervisor (perf showed glibc's init_cpu_features and handle_amd at the top of the launcher's CPU): on
 * this project's VM a member of `true` costs 0.05 ms of CPU more than `true` alone through this build, and
 * 0.41 ms more through the static glibc one (benchmarks/launcher.py). Elsewhere it is built against the C
 * library, with the same behaviour.
 */
#define LAUNCH_FAILED 125
#define EXEC_FAILED 127
#define BOURNE_SHELL "/bin/sh"

#ifdef JOBSERVICE_NOLIBC

/* The kernel's values (uapi headers), the same on x86-64 and arm64. */
#define PR_SET_PDEATHSIG 1
#define SIGKILL 9
#define O_WRONLY 01
#define O_CLOEXEC 02000000
#define ENOEXEC 8
#define AT_FDCWD -100

#if defined(__x86_64__)
#define NR_WRITE 1
#define NR_CLOSE 3
#define NR_EXECVE 59
#define NR_EXIT 60
#define NR_GETPPID 110
#define NR_PRCTL 157
#define NR_OPENAT 257

static long sys6(long n, long a, long b, long c, long d, long e) {
    long result;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    __asm__ volatile("syscall" : "=a"(result) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8) : "rcx", "r11", "memory");
    return result;
}

/* The kernel enters with the stack holding argc, argv..., 0, envp..., 0; the C entry wants it 16-byte aligned. */
__asm__(".text\n.global _start\n_start:\n xor %rbp, %rbp\n mov %rsp, %rdi\n and $-16, %rsp\n call launch_entry\n hlt\n");

#elif defined(__aarch64__)
#define NR_OPENAT 56
#define NR_CLOSE 57
#define NR_WRITE 64
#define NR_EXIT 93
#define NR_PRCTL 167
#define NR_GETPPID 173
#define NR_EXECVE 221

static long sys6(long n, long a, long b, long c, long d, long e) {
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    register long x4 __asm__("x4") = e;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4) : "memory");
    return x0;
}

__asm__(".text\n.global _start\n_start:\n mov x29, #0\n mov x30, #0\n mov x0, sp\n and sp, x0, #-16\n bl launch_entry\n");

#else
#error "JOBSERVICE_NOLIBC: only x86-64 and arm64 Linux; build without it"
#endif

static int last_error;

/* The C library's convention: -1 and the error kept (a raw system call returns -errno). */
static long checked(long result) {
    if (result < 0 && result > -4096) {
        last_error = (int)-result;
        return -1;
    }
    return result;
}

static int open_for_writing(const char *path) { return (int)checked(sys6(NR_OPENAT, AT_FDCWD, (long)path, O_WRONLY | O_CLOEXEC, 0, 0)); }
static long write_some(int fd, const char *data, unsigned long size) { return checked(sys6(NR_WRITE, fd, (long)data, (long)size, 0, 0)); }
static void close_fd(int fd) { sys6(NR_CLOSE, fd, 0, 0, 0, 0); }
static int set_death_signal(void) { return (int)checked(sys6(NR_PRCTL, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)); }
static long parent_pid(void) { return sys6(NR_GETPPID, 0, 0, 0, 0, 0); }
static void exec(const char *path, char **argv, char **envp) { checked(sys6(NR_EXECVE, (long)path, (long)argv, (long)envp, 0, 0)); }
static int error_number(void) { return last_error; }

static unsigned long length(const char *text) {
    unsigned long n = 0;
    while (text[n] != '\0') n++;
    return n;
}

static int same(const char *a, const char *b) {
    while (*a != '\0' && *a == *b) a++, b++;
    return *a == *b;
}

/* The messages the C library gives for the errors that opening a cgroup file and exec can meet. */
static const char *error_text(int error) {
    switch (error) {
    case 1: return "Operation not permitted";
    case 2: return "No such file or directory";
    case 5: return "Input/output error";
    case 7: return "Argument list too long";
    case 8: return "Exec format error";
    case 12: return "Cannot allocate memory";
    case 13: return "Permission denied";
    case 14: return "Bad address";
    case 16: return "Device or resource busy";
    case 19: return "No such device";
    case 20: return "Not a directory";
    case 21: return "Is a directory";
    case 22: return "Invalid argument";
    case 23: return "Too many open files in system";
    case 24: return "Too many open files";
    case 26: return "Text file busy";
    case 28: return "No space left on device";
    case 30: return "Read-only file system";
    case 36: return "File name too long";
    case 40: return "Too many levels of symbolic links";
    case 95: return "Operation not supported";
    default: return "Unknown error";
    }
}

static void say(const char *const *parts) {
    for (; *parts != 0; parts++) write_some(2, *parts, length(*parts));
}

static int launch(int argc, char **argv, char **envp);

__attribute__((used, noreturn)) void launch_entry(long *stack) {
    int argc = (int)stack[0];
    char **argv = (char **)(stack + 1);
    int status = launch(argc, argv, argv + argc + 1);
    for (;;) sys6(NR_EXIT, status, 0, 0, 0, 0);
}

#else /* against the C library */

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

extern char **environ;

static int open_for_writing(const char *path) { return open(path, O_WRONLY | O_CLOEXEC); }
static long write_some(int fd, const char *data, unsigned long size) { return write(fd, data, size); }
static void close_fd(int fd) { close(fd); }
static int set_death_signal(void) { return prctl(PR_SET_PDEATHSIG, SIGKILL); }
static long parent_pid(void) { return getppid(); }
static void exec(const char *path, char **argv, char **envp) { execve(path, argv, envp); }
static int error_number(void) { return errno; }
static int same(const char *a, const char *b) { return strcmp(a, b) == 0; }
static const char *error_text(int error) { return strerror(error); }

static void say(const char *const *parts) {
    for (; *parts != NULL; parts++) fputs(*parts, stderr);
}

static int launch(int argc, char **argv, char **envp);

int main(int argc, char **argv) { return launch(argc, argv, environ); }

#endif

/* A decimal pid above 1, or 0. */
static long parse_pid(const char *text) {
    long value = 0;
    if (*text == '\0') return 0;
    for (; *text != '\0'; text++) {
        if (*text < '0' || *text > '9' || value > 100000000L) return 0;
        value = value * 10 + (*text - '0');
    }
    return value > 1 ? value : 0;
}

static int launch(int argc, char **argv, char **envp) {
    if (argc < 4) {
        const char *usage[] = {"usage: jobservice-launch <worker pid> <cgroup.procs|-> <program> [arguments...]\n", 0};
        say(usage);
        return LAUNCH_FAILED;
    }
    long worker = parse_pid(argv[1]);
    if (worker == 0) {
        const char *bad[] = {"jobservice: bad worker pid ", argv[1], "\n", 0};
        say(bad);
        return LAUNCH_FAILED;
    }
    if (!same(argv[2], "-")) {
        int procs = open_for_writing(argv[2]);
        if (procs < 0 || write_some(procs, "0", 1) != 1) {
            const char *failed[] = {"jobservice: cannot join the attempt's cgroup (", argv[2], "): ", error_text(error_number()), "\n", 0};
            say(failed);
            return LAUNCH_FAILED;
        }
        close_fd(procs);
    }
    if (set_death_signal() != 0) {
        const char *failed[] = {"jobservice: cannot set the death signal: ", error_text(error_number()), "\n", 0};
        say(failed);
        return LAUNCH_FAILED;
    }
    if (parent_pid() != worker) {
        return LAUNCH_FAILED; /* the worker is gone already: nobody would stop this member */
    }
    exec(argv[3], argv + 3, envp);
    int error = error_number();
    if (error == ENOEXEC) {
        /* As execvp: a file the kernel cannot run is a script for the shell; argv[2] is free to become its argv[0]. */
        argv[2] = BOURNE_SHELL;
        exec(BOURNE_SHELL, argv + 2, envp);
    }
    const char *failed[] = {"jobservice: cannot run ", argv[3], ": ", error_text(error), "\n", 0};
    say(failed);
    return EXEC_FAILED;
}
