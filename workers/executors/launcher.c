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
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#define LAUNCH_FAILED 125
#define EXEC_FAILED 127

int main(int argc, char **argv) {
    if (argc < 4) {
        fputs("usage: jobservice-launch <worker pid> <cgroup.procs|-> <program> [arguments...]\n", stderr);
        return LAUNCH_FAILED;
    }
    char *end = NULL;
    errno = 0;
    long worker = strtol(argv[1], &end, 10);
    if (errno != 0 || end == argv[1] || *end != '\0' || worker <= 1) {
        fprintf(stderr, "jobservice: bad worker pid %s\n", argv[1]);
        return LAUNCH_FAILED;
    }
    if (strcmp(argv[2], "-") != 0) {
        int procs = open(argv[2], O_WRONLY | O_CLOEXEC);
        if (procs < 0 || write(procs, "0", 1) != 1) {
            fprintf(stderr, "jobservice: cannot join the attempt's cgroup (%s): %s\n", argv[2], strerror(errno));
            return LAUNCH_FAILED;
        }
        close(procs);
    }
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) {
        fprintf(stderr, "jobservice: cannot set the death signal: %s\n", strerror(errno));
        return LAUNCH_FAILED;
    }
    if (getppid() != (pid_t)worker) {
        return LAUNCH_FAILED; /* the worker is gone already: nobody would stop this member */
    }
    execvp(argv[3], argv + 3);
    fprintf(stderr, "jobservice: cannot run %s: %s\n", argv[3], strerror(errno));
    return EXEC_FAILED;
}
